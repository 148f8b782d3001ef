"""`n` choices against separate requests on a running `exo-node serve` (docs/benchmarks.md).

Usage: python3 n_choices.py API_URL SHARD_URL EXO_HOME CLUSTER_KEY [EXO_NODE_BINARY]
(API_URL like http://127.0.0.1:52415/v1, SHARD_URL the node's shard service).
"""
import json, os, sys, time, urllib.request, subprocess, concurrent.futures as cf
api, grpc, home, key = sys.argv[1:5]
binary = sys.argv[5] if len(sys.argv) > 5 else "exo-node"
prompt = " ".join(["The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill."] * 20)
def post(body):
    req = urllib.request.Request(api + "/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.time(); r = json.load(urllib.request.urlopen(req)); return r, time.time() - t
def rows():
    out = subprocess.run([binary, "status", "--node", grpc, "--cluster-key", key], capture_output=True, text=True, env=dict(os.environ, EXO_HOME=home), check=True)
    return json.loads(out.stdout)["positions_computed"]
model = json.load(urllib.request.urlopen(api + "/models"))["data"][0]["id"]
base = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0.8, "seed": 1}
post(dict(base, max_tokens=2))  # warm up
for run in range(3):
    r0 = rows(); r, t_n = post(dict(base, n=4)); r1 = rows()
    pt = r["usage"]["prompt_tokens"]
    with cf.ThreadPoolExecutor(4) as ex:
        t = time.time(); list(ex.map(lambda i: post(dict(base, seed=1 + i)), range(4))); t_sep = time.time() - t
    r2 = rows()
    print(f"prompt {pt} tokens: n=4 one request {t_n:.2f} s, {r1 - r0} rows; 4 separate requests {t_sep:.2f} s, {r2 - r1} rows")
