#!/usr/bin/env python3
"""Records llama.cpp's reference outputs for Gemma 3 270M into
crates/exo-shard/tests/fixtures/gemma3-270m.json: for each prompt, llama.cpp's tokenization
(BOS added) and its 32 greedy tokens (EOS ignored) on an F32 dequantization of the packaged
Q4_K_M file, from a running llama-server.

    llama-server -m gemma-3-270m-f32.gguf --port 8089 -t 2 -c 512 &
    python3 xtask/scripts/record_gemma3.py http://127.0.0.1:8089 > crates/exo-shard/tests/fixtures/gemma3-270m.json

(`cargo xtask bench-cluster --api-only` builds llama-server into ~/.cache/exo-rs/llama-bench;
the F32 file is what exo_model::testing::write_dequantized_gguf writes, or
`llama-quantize --allow-requantize gemma-3-270m-q4_k_m.gguf gemma-3-270m-f32.gguf F32`.)
"""
import json
import sys
import urllib.request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
    "Der schnellste Weg nach München ist",
]


def post(base, path, body):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def main():
    base = sys.argv[1].rstrip("/")
    out = {
        "model": "gemma-3-270m-q4_k_m.gguf (sha256 a5fd3b62...6818) dequantized to F32",
        "engine": "llama.cpp llama-server (vendored by llama-cpp-python 0.3.x), CPU, greedy",
        "prompts": [],
    }
    for text in PROMPTS:
        ids = post(base, "/tokenize", {"content": text, "add_special": True})["tokens"]
        done = post(
            base,
            "/completion",
            {
                "prompt": ids,
                "n_predict": 32,
                "temperature": 0.0,
                "top_k": 1,
                "ignore_eos": True,
                "cache_prompt": False,
                "return_tokens": True,
                "samplers": ["top_k"],
            },
        )
        out["prompts"].append(
            {"text": text, "prompt_ids": ids, "greedy_ids": done["tokens"], "greedy_text": done["content"]}
        )
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
