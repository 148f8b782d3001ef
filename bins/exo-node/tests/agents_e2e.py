"""What agents and frameworks build on, with their own client libraries, against a running
exo-node: structured output (the openai SDK's `.parse` with a Pydantic model, LangChain's
`with_structured_output`), tool calls (the openai SDK whole and streamed, LangChain's
`bind_tools`, the Anthropic SDK on /v1/messages) and a tool's result going back in so the
answer continues; embeddings (the openai SDK, base64 and float, and LangChain's
OpenAIEmbeddings).

Run by tests/agents_clients.rs; exits non-zero with a message on the first failed check.
"""

import argparse
import json
import sys
from typing import List

import openai
from openai import OpenAI
from pydantic import BaseModel, Field


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int
    hobbies: List[str] = Field(max_length=3)


class Capital(BaseModel):
    country: str = Field(max_length=40)
    capital: str = Field(max_length=40)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def openai_checks(client, model, results):
    # Structured output: `.parse` sends a strict json_schema and validates the answer.
    for seed in range(3):
        parsed = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "Describe a person: name, age and hobbies."}],
            response_format=Person,
            max_tokens=200,
            temperature=0.7,
            seed=seed,
        )
        person = parsed.choices[0].message.parsed
        check(isinstance(person, Person), f"parse gave {parsed}")
    results["parse"] = person.model_dump()

    # json_object: any JSON object.
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reply in JSON with the capital of France."}],
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0,
    )
    text = reply.choices[0].message.content
    check(reply.choices[0].finish_reason == "stop", f"json_object did not end: {reply}")
    check(isinstance(json.loads(text), dict), f"json_object gave {text!r}")
    results["json_object"] = text

    # A required call, whole: parsed into tool_calls with arguments valid for the schema.
    reply = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=100,
        temperature=0,
    )
    choice = reply.choices[0]
    check(choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason}")
    calls = choice.message.tool_calls
    check(calls and len(calls) == 1, f"tool_calls {calls}")
    call = calls[0]
    check(call.function.name in ("get_weather", "get_time"), f"called {call.function.name}")
    args = json.loads(call.function.arguments)
    results["required_call"] = {"name": call.function.name, "arguments": args}

    # A named function, streamed: the SDK's deltas add up to the call.
    stream = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=100,
        temperature=0,
        stream=True,
    )
    name, arguments, finish, content = None, "", None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            content += delta.content
        for tc in delta.tool_calls or []:
            name = tc.function.name or name
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    check(name == "get_weather", f"streamed call named {name!r}")
    check(finish == "tool_calls", f"streamed finish {finish!r}")
    check(content == "", f"a forced call streamed text {content!r}")
    args = json.loads(arguments)
    check(set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), f"{args}")
    results["named_call_streamed"] = args

    # The round trip: the call and its result go back in, and the model answers in text.
    messages = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=60,
        temperature=0,
    )
    answer = reply.choices[0].message
    check(answer.tool_calls is None, f"tool_choice none still called {answer.tool_calls}")
    check(answer.content, f"no answer after the tool result: {reply}")
    results["after_tool"] = answer.content

    # Log-probabilities: one entry per token, the likeliest alternatives in order, and a
    # greedy answer's tokens the likeliest of their positions.
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=3,
    )
    entries = reply.choices[0].logprobs.content
    check(len(entries) == reply.usage.completion_tokens
          or (reply.choices[0].finish_reason == "stop" and len(entries) == reply.usage.completion_tokens - 1),
          f"{len(entries)} entries for {reply.usage.completion_tokens} tokens")
    for e in entries:
        check(e.logprob <= 0 and len(e.top_logprobs) == 3, f"{e}")
        check(e.top_logprobs[0].token == e.token, f"greedy took {e.token!r}, likeliest {e.top_logprobs[0]}")
    check("".join(e.token for e in entries) == reply.choices[0].message.content,
          f"tokens {[e.token for e in entries]} vs {reply.choices[0].message.content!r}")
    results["logprobs"] = [(e.token, round(e.logprob, 3)) for e in entries]

    # Completions' echo with logprobs, as evaluation harnesses score a text: the prompt's
    # tokens first (the first without a log-probability), then the answer's.
    prompt = "The capital of France is Paris. The capital of Germany is"
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=1, echo=True,
                                      logprobs=1, temperature=0)
    choice = reply.choices[0]
    lists = choice.logprobs
    check(choice.text.startswith(prompt), f"echo: {choice.text!r}")
    check(len(lists.tokens) == reply.usage.prompt_tokens + reply.usage.completion_tokens,
          f"{len(lists.tokens)} tokens for {reply.usage}")
    check("".join(lists.tokens) == choice.text, f"tokens {lists.tokens} vs {choice.text!r}")
    check(lists.token_logprobs[0] is None and lists.top_logprobs[0] is None, "the first is null")
    check(all(l <= 0 for l in lists.token_logprobs[1:]), f"{lists.token_logprobs}")
    check(lists.text_offset == sorted(lists.text_offset), f"offsets {lists.text_offset}")
    # "Paris" after "The capital of France is" is far likelier than the sentence's first
    # words were.
    paris = lists.tokens.index(" Paris")
    check(lists.token_logprobs[paris] > lists.token_logprobs[1],
          f"Paris {lists.token_logprobs[paris]} vs {lists.tokens[1]!r} {lists.token_logprobs[1]}")
    results["echo"] = [(t, None if l is None else round(l, 2))
                       for t, l in zip(lists.tokens, lists.token_logprobs)]

    # A schema the engine cannot compile is a 400 that names the field.
    try:
        client.chat.completions.create(
            model=model,
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "colour"}}},
            max_tokens=10,
        )
        check(False, "an impossible schema was accepted")
    except Exception as e:  # openai.BadRequestError
        check(getattr(e, "status_code", None) == 400, f"impossible schema: {e!r}")
        body = getattr(e, "body", None) or {}
        check(body.get("param") == "response_format", f"impossible schema blamed on {body}")
        results["bad_schema"] = body.get("message")


def responses_checks(client, model, results):
    # The Responses API: text, its event stream, structured output and a function call.
    reply = client.responses.create(model=model, input="What is the capital of France?",
                                    instructions="Answer in one sentence.", max_output_tokens=40,
                                    temperature=0)
    check(reply.status in ("completed", "incomplete") and reply.output_text, f"{reply!r}")
    results["responses_text"] = reply.output_text
    streamed, done = "", None
    for event in client.responses.create(model=model, input="What is the capital of France?",
                                         instructions="Answer in one sentence.",
                                         max_output_tokens=40, temperature=0, stream=True):
        if event.type == "response.output_text.delta":
            streamed += event.delta
        elif event.type in ("response.completed", "response.incomplete"):
            done = event.response
    check(streamed == reply.output_text, f"streamed {streamed!r} vs {reply.output_text!r}")
    check(done is not None and done.output_text == streamed, f"final {done!r}")
    parsed = client.responses.parse(model=model, input="What is the capital of France?",
                                    text_format=Capital, max_output_tokens=100, temperature=0)
    check(isinstance(parsed.output_parsed, Capital), f"{parsed!r}")
    results["responses_parse"] = parsed.output_parsed.model_dump()
    tool = {"type": "function", "name": "get_weather", "description": "Weather of a city",
            "parameters": WEATHER["function"]["parameters"]}
    called = client.responses.create(model=model, input="What is the weather in Paris?",
                                     tools=[tool], tool_choice="required", max_output_tokens=80,
                                     temperature=0)
    calls = [o for o in called.output if o.type == "function_call"]
    check(len(calls) == 1 and calls[0].name == "get_weather", f"{called.output!r}")
    args = json.loads(calls[0].arguments)
    after = client.responses.create(
        model=model, max_output_tokens=40, temperature=0, tools=[tool],
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "Sunny, 21 degrees."}],
    )
    check(after.output_text is not None, f"{after!r}")
    results["responses_call"] = args


def langchain_checks(base_url, api_key, model, results):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=model, max_tokens=120,
                     temperature=0, max_retries=0, timeout=120)

    structured = llm.with_structured_output(Capital, method="json_schema")
    capital = structured.invoke("What is the capital of France?")
    check(isinstance(capital, Capital), f"with_structured_output gave {capital!r}")
    results["langchain_structured"] = capital.model_dump()

    @tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        return f"It is sunny and 21 degrees in {city}."

    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Paris?")
    first = bound.invoke([question])
    check(first.tool_calls, f"bind_tools gave no tool call: {first!r}")
    call = first.tool_calls[0]
    check(call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), f"{call}")
    result = get_weather.invoke(call["args"])
    follow = llm.bind_tools([get_weather]).invoke(
        [question, first, ToolMessage(result, tool_call_id=call["id"])]
    )
    check(isinstance(follow.content, str), f"after the tool: {follow!r}")
    results["langchain_call"] = call["args"]
    results["langchain_after_tool"] = follow.content


def anthropic_checks(base_url, api_key, model, results):
    import anthropic

    # The SDK appends /v1/messages to the host. This SDK version has no `temperature`
    # argument; the API still takes the field.
    client = anthropic.Anthropic(base_url=base_url.removesuffix("/v1"), api_key=api_key,
                                 max_retries=0, timeout=120)
    reply = client.messages.create(
        model=model, max_tokens=40, extra_body={"temperature": 0}, system="Answer in one short sentence.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    check(reply.type == "message" and reply.role == "assistant", f"{reply!r}")
    check(reply.content[0].type == "text" and reply.content[0].text, f"{reply!r}")
    check(reply.stop_reason in ("end_turn", "max_tokens"), f"stop_reason {reply.stop_reason}")
    check(reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0, f"{reply.usage}")
    results["anthropic_text"] = reply.content[0].text

    # Streamed: the SDK's stream helper puts the events back together.
    with client.messages.stream(
        model=model, max_tokens=40, extra_body={"temperature": 0},
        system="Answer in one short sentence.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(streamed == reply.content[0].text, f"streamed {streamed!r} vs {reply.content[0].text!r}")
    check(final.usage.input_tokens == reply.usage.input_tokens, f"{final.usage}")

    # A forced tool call, streamed, and its result going back in.
    weather = {
        "name": "get_weather",
        "description": "The current weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                         "required": ["city"]},
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.messages.stream(
        model=model, max_tokens=60, tools=[weather], tool_choice={"type": "any"}, messages=ask,
        extra_body={"temperature": 0},
    ) as stream:
        called = stream.get_final_message()
    check(called.stop_reason == "tool_use", f"stop_reason {called.stop_reason}: {called!r}")
    use = [b for b in called.content if b.type == "tool_use"]
    check(len(use) == 1 and use[0].name == "get_weather", f"{called.content!r}")
    check(isinstance(use[0].input.get("city"), str), f"{use[0].input!r}")
    after = client.messages.create(
        model=model, max_tokens=40, extra_body={"temperature": 0}, tools=[weather],
        messages=ask + [
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id,
                                          "content": "Sunny, 21 degrees."}]},
        ],
    )
    check(after.content and after.content[0].type == "text", f"after the tool: {after!r}")
    results["anthropic_call"] = use[0].input
    results["anthropic_after_tool"] = after.content[0].text

    # Errors in Anthropic's shape.
    try:
        client.messages.create(model=model, max_tokens=0, messages=ask)
        check(False, "max_tokens 0 was accepted")
    except anthropic.BadRequestError as e:
        check(e.body["error"]["type"] == "invalid_request_error", f"{e.body}")


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


EMBED_TEXTS = [
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "My cat sleeps on the warm windowsill all afternoon.",
]


def embeddings_checks(client, base_url, api_key, model, results):
    # The SDK asks for base64 unless told otherwise, and decodes it to floats.
    reply = client.embeddings.create(model=model, input=EMBED_TEXTS)
    vectors = [d.embedding for d in reply.data]
    check([d.index for d in reply.data] == [0, 1, 2], f"indexes {[d.index for d in reply.data]}")
    width = len(vectors[0])
    check(width > 0 and all(len(v) == width for v in vectors), f"widths {[len(v) for v in vectors]}")
    for v in vectors:
        check(abs(sum(x * x for x in v) - 1) < 1e-3, "embeddings are L2-normalised")
    check(reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens,
          f"usage {reply.usage}")
    floats = client.embeddings.create(model=model, input=EMBED_TEXTS[0], encoding_format="float")
    check(cosine(floats.data[0].embedding, vectors[0]) > 0.999,
          "one text alone, as floats, embeds like it did in a batch, as base64")
    # Meaning, even from a 135M chat model: the two capitals are closer to each other than to
    # the cat.
    capitals, cat = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    check(capitals > cat, f"capitals {capitals:.3f} vs cat {cat:.3f}")
    try:
        client.embeddings.create(model=model, input=[[1, 2, 3]])
        check(False, "token ids are refused")
    except openai.BadRequestError as error:
        check("check_embedding_ctx_length" in str(error), f"the refusal says what to do: {error}")

    # LangChain's OpenAIEmbeddings, told to send text (by default it sends tiktoken's ids).
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(base_url=base_url, api_key=api_key, model=model,
                                check_embedding_ctx_length=False, max_retries=0)
    documents = embedder.embed_documents(EMBED_TEXTS)
    query = embedder.embed_query(EMBED_TEXTS[1])
    check(len(documents) == 3 and all(len(d) == width for d in documents), "LangChain's widths")
    check(all(cosine(d, v) > 0.999 for d, v in zip(documents, vectors)), "LangChain's documents")
    check(cosine(query, vectors[1]) > 0.999, "LangChain's query")
    results["embeddings"] = {"width": width, "capitals": round(capitals, 4), "cat": round(cat, 4)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    results = {}
    openai_checks(client, model, results)
    responses_checks(client, model, results)
    langchain_checks(args.base_url, args.api_key, model, results)
    anthropic_checks(args.base_url, args.api_key, model, results)
    embeddings_checks(client, args.base_url, args.api_key, model, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
