"""litellm (the proxy library many agent frameworks call through) against a running exo-node,
as an OpenAI-compatible provider: plain and streamed chat, a forced tool call, and a JSON
schema. Run by tests/agents_clients.rs; exits non-zero with a message on the first failed
check."""

import argparse
import json
import os
import sys

# litellm fetches its model price list from the network at import unless told not to.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import litellm  # noqa: E402


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    common = dict(model=f"openai/{args.model}", api_base=args.base_url, api_key="none",
                  temperature=0, max_tokens=40)
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    results = {}

    reply = litellm.completion(messages=ask, **common)
    text = reply.choices[0].message.content
    check("Paris" in text, f"plain chat: {text!r}")
    check(reply.usage.completion_tokens > 0, f"usage {reply.usage}")
    results["chat"] = text

    pieces = [c.choices[0].delta.content or "" for c in litellm.completion(messages=ask, stream=True, **common)]
    check("".join(pieces) == text, f"streamed {''.join(pieces)!r} vs {text!r}")

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                       "required": ["city"]}}}]
    reply = litellm.completion(messages=[{"role": "user", "content": "Weather in Paris?"}],
                               tools=tools, tool_choice="required", **common)
    calls = reply.choices[0].message.tool_calls
    check(calls and calls[0].function.name == "get_weather", f"tool call: {reply}")
    results["call"] = json.loads(calls[0].function.arguments)

    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 40}},
              "required": ["capital"], "additionalProperties": False}
    reply = litellm.completion(
        messages=ask, response_format={"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        **common)
    answer = json.loads(reply.choices[0].message.content)
    check(isinstance(answer.get("capital"), str), f"schema: {answer}")
    results["schema"] = answer
    print(json.dumps(results))


if __name__ == "__main__":
    main()
