"""The official `ollama` Python client against a running exo-node's Ollama dialect (/api/*).

Run by tests/ollama_client.rs; exits non-zero with a message on the first failed check.
"""

import argparse
import json
import sys
import urllib.request

import ollama

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"num_predict": 24, "temperature": 0, "seed": 0}


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    args = parser.parse_args()
    client = ollama.Client(host=args.host, timeout=120)
    results = {}

    with urllib.request.urlopen(f"{args.host}/api/version", timeout=30) as response:
        version = json.load(response)
    check(version.get("version"), f"a version: {version}")

    models = client.list().models
    check(len(models) == 1, f"one model listed, got {models}")
    model = models[0].model
    check(len(models[0].digest) == 64, f"a sha256 digest: {models[0]}")
    results["model"] = model

    shown = client.show(model)
    lengths = [v for k, v in shown.modelinfo.items() if k.endswith(".context_length")]
    check(lengths and lengths[0] > 0, f"a context length in model_info: {shown.modelinfo}")
    check("completion" in (shown.capabilities or []), f"capabilities: {shown.capabilities}")

    answer = client.chat(model=model, messages=QUESTION, options=GREEDY)
    text = answer.message.content
    check(answer.message.role == "assistant", f"role: {answer.message}")
    check("Paris" in text, f"non-streaming answer mentions Paris: {text!r}")
    check(answer.done and answer.done_reason in ("stop", "length"), f"done: {answer}")
    check(answer.prompt_eval_count > 0, f"prompt tokens counted: {answer}")
    check(0 < answer.eval_count <= 24, f"completion tokens within num_predict: {answer}")
    check(answer.total_duration > 0, f"total duration: {answer}")
    results["chat"] = text

    pieces, last = [], None
    for part in client.chat(model=model, messages=QUESTION, options=GREEDY, stream=True):
        if part.done:
            last = part
        else:
            pieces.append(part.message.content or "")
    check(last is not None, "the stream ends with a done line")
    check(len(pieces) > 1, f"more than one piece streamed: {pieces}")
    streamed = "".join(pieces)
    check(streamed == text, f"streamed greedy answer {streamed!r} equals the whole one {text!r}")
    check(last.eval_count == answer.eval_count, f"same counts: {last} vs {answer}")
    results["stream"] = streamed

    generated = client.generate(
        model=model, prompt="The capital of France is", options={"num_predict": 8, "temperature": 0}
    )
    check(generated.done, f"generate done: {generated}")
    check(generated.response, f"generate answered: {generated}")
    check(0 < generated.eval_count <= 8, f"at most 8 tokens: {generated}")
    results["generate"] = generated.response

    # Structured output: `format` as a JSON schema, enforced by constrained decoding.
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 40}},
              "required": ["capital"]}
    shaped = client.chat(model=model, messages=QUESTION, format=schema,
                         options={"num_predict": 40, "temperature": 0})
    answer = json.loads(shaped.message.content)
    check(isinstance(answer.get("capital"), str), f"format: {shaped.message.content!r}")
    results["format"] = answer

    # Embeddings, the current form and the older one.
    embedded = client.embed(model=model, input=["Paris is in France.", "Berlin is in Germany."])
    vectors = embedded.embeddings
    check(len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0, f"embed: {embedded}")
    check(abs(sum(x * x for x in vectors[0]) - 1) < 1e-3, "embeddings are normalised")
    check(embedded.prompt_eval_count > 0, f"prompt tokens counted: {embedded}")
    older = client.embeddings(model=model, prompt="Paris is in France.")
    check(len(older.embedding) == len(vectors[0]), f"embeddings: {len(older.embedding)} values")
    results["embedding_width"] = len(vectors[0])

    try:
        client.chat(model="no-such-model", messages=QUESTION)
        check(False, "an unknown model is refused")
    except ollama.ResponseError as error:
        check(error.status_code == 404, f"404 for an unknown model: {error}")

    print(json.dumps(results))


if __name__ == "__main__":
    main()
