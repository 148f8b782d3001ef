"""The official `openai` Python SDK against a running exo-node (and optionally a gateway).

Run by tests/openai_sdk.rs; exits non-zero with a message on the first failed check.
"""

import argparse
import json
import sys

import openai
from openai import OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def stream_text(client, model, **kwargs):
    pieces, usage, finish = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
        if chunk.usage:
            usage = chunk.usage
    return "".join(pieces), usage, finish


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--gateway-url")
    parser.add_argument("--gateway-key")
    args = parser.parse_args()
    results = {"openai": openai.__version__}

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    models = client.models.list().data
    check(len(models) == 1, f"one model listed, got {models}")
    model = models[0].id
    results["model"] = model

    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    text = answer.choices[0].message.content
    check("Paris" in text, f"non-streaming answer mentions Paris: {text!r}")
    check(answer.choices[0].finish_reason in ("stop", "length"), answer.choices[0].finish_reason)
    check(answer.usage.prompt_tokens == 37, f"37 prompt tokens, got {answer.usage}")
    check(answer.usage.completion_tokens > 0, f"usage {answer.usage}")
    results["chat"] = text

    streamed, usage, finish = stream_text(client, model, max_tokens=24, temperature=0)
    check(streamed == text, f"streamed {streamed!r} != non-streamed {text!r}")
    check(usage is not None and usage.completion_tokens == answer.usage.completion_tokens, f"usage {usage}")
    check(finish == answer.choices[0].finish_reason, f"finish {finish}")

    limited = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, temperature=0)
    check(limited.choices[0].finish_reason == "length", f"max_tokens=2 ends by length: {limited}")
    check(limited.usage.completion_tokens == 2, f"{limited.usage}")

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    check(len(completion.choices[0].text) > 0, f"text completion {completion}")
    results["completion"] = completion.choices[0].text

    try:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
        check(False, "an unknown model must raise NotFoundError")
    except openai.NotFoundError as e:
        check(model in str(e), f"the error lists the available model: {e}")

    wrong = OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0, timeout=30)
    try:
        wrong.models.list()
        check(False, "a wrong API key must raise AuthenticationError")
    except openai.AuthenticationError:
        pass

    if args.gateway_url:
        gateway = OpenAI(base_url=args.gateway_url, api_key=args.gateway_key, max_retries=0, timeout=120)
        gmodels = gateway.models.list().data
        check([m.id for m in gmodels] == [model], f"gateway lists {gmodels}")
        through, gusage, _ = stream_text(gateway, model, max_tokens=24, temperature=0)
        check(through == text, f"through the gateway {through!r} != direct {text!r}")
        check(gusage is not None and gusage.prompt_tokens == 37, f"gateway usage {gusage}")
        results["gateway"] = through
        # An embedding through the gateway, computed by the two nodes' pipeline, is the one
        # node's (up to the f16 activations between the stages).
        text_in = "Paris is in France."
        direct = client.embeddings.create(model=model, input=text_in).data[0].embedding
        via = gateway.embeddings.create(model=model, input=text_in).data[0].embedding
        dot = sum(x * y for x, y in zip(direct, via))
        check(len(via) == len(direct) and dot > 0.999, f"gateway embedding: cosine {dot}")
        results["gateway_embedding_cosine"] = round(dot, 6)
        # Log-probabilities through the gateway too: one per token, before the text.
        scored = gateway.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6,
            temperature=0, logprobs=True, top_logprobs=2,
        )
        entries = scored.choices[0].logprobs.content
        check(entries and "".join(e.token for e in entries) == scored.choices[0].message.content,
              f"gateway logprobs {entries} for {scored.choices[0].message.content!r}")

    print(json.dumps(results))


if __name__ == "__main__":
    main()
