#!/usr/bin/env python3
"""Models over the LAN, measured: nodes without the model file fetch their layers from peers.

Runs `exo-node serve` processes in network namespaces of their own (a bridge, a veth per node,
each link capped with `tc tbf`), as the issue's benchmark asks. Needs root and iproute2.

    python3 xtask/scripts/lan_fetch.py EXO_NODE MODEL.gguf [MBIT]

1. Three nodes, only the first has the model file; every link capped at MBIT (default 100)
   both ways. Reports the time from starting the two empty nodes to the first answer through
   one of them, the bytes each received (against its shard's chunks), and the rate against
   the cap.
2. One source against two: a node without the file fetches the same layers (half the model)
   from one node holding the file, then from two (the second offers too little memory to be
   given layers, so the split stays the same). The sources' links are capped at MBIT, the
   fetcher's at 4 x MBIT (so the sources' links are what limits), and the fetch times compared.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

KEY = "1a2b3c4d" * 8
PREFIX = f"exl{os.getpid() % 100000}"


def sh(*args):
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


class Lab:
    """A bridge namespace and one namespace per node, node i at 10.214.0.(i+1)."""

    def __init__(self, caps_mbit):
        self.switch = f"{PREFIX}sw"
        self.nodes = [f"{PREFIX}n{i}" for i in range(len(caps_mbit))]
        self.procs = []
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, cap) in enumerate(zip(self.nodes, caps_mbit)):
            sh("ip", "netns", "add", ns)
            port = f"p{i}"
            sh("ip", "link", "add", port, "netns", self.switch, "type", "veth", "peer",
               "name", "eth0", "netns", ns)
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", port, "up")
            sh("ip", "-n", ns, "addr", "add", f"10.214.0.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for where, dev in ((ns, "eth0"), (self.switch, port)):
                sh("tc", "-n", where, "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                   f"{cap}mbit", "burst", "64kb", "latency", "50ms")

    def ip(self, i):
        return f"10.214.0.{i + 1}"

    def start(self, i, home, model, memory, peers, extra=()):
        log = open(os.path.join(home, "log"), "w")
        args = ["ip", "netns", "exec", self.nodes[i], EXE, "serve", "--no-mdns",
                "--cluster-key", KEY, "--memory-limit", memory, "--model", model,
                "--listen", f"/ip4/{self.ip(i)}/tcp/52416",
                "--grpc-listen", f"{self.ip(i)}:52417", "--api-addr", "127.0.0.1:52415",
                "--threads", "1", *extra]
        for p in peers:
            args += ["--peer", f"{self.ip(p)}:52416"]
        env = dict(os.environ, EXO_HOME=home, NO_COLOR="1")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        self.procs.append(proc)
        return proc

    def chat(self, i):
        body = json.dumps({"model": MODEL_ID, "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "Hi"}]})
        return sh("ip", "netns", "exec", self.nodes[i], "curl", "-sf", "-m", "60",
                  "-H", "Content-Type: application/json", "-d", body,
                  "http://127.0.0.1:52415/v1/chat/completions")

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        for ns in self.nodes + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def log_of(home):
    with open(os.path.join(home, "log"), errors="replace") as f:
        return f.read()


def wait_for(home, text, within=300):
    deadline = time.time() + within
    while text not in log_of(home):
        if time.time() > deadline:
            raise RuntimeError(f"`{text}` not logged in {home}:\n{log_of(home)[-3000:]}")
        time.sleep(0.05)


def fetched(home):
    """(bytes received, seconds, what) of the "fetched from peers" line for the node's layers."""
    for line in log_of(home).splitlines():
        if "fetched from peers" in line and "layers" in line:
            got = int(re.search(r"received_bytes=(\d+)", line).group(1))
            seconds = float(re.search(r"seconds=([\d.e-]+)", line).group(1))
            what = re.search(r"what=(.*?) mib=", line).group(1)
            return got, seconds, what
    raise RuntimeError("no fetch logged")


def received_total(home):
    return sum(int(m) for m in re.findall(r"fetched from peers.*?received_bytes=(\d+)",
                                           log_of(home)))


def held_bytes(home):
    """Bytes of the chunks the node's store holds, from its manifest and held record."""
    store = os.path.join(home, "store")
    for entry in os.listdir(store):
        manifest_path = os.path.join(store, entry, "manifest.json")
        held_path = os.path.join(store, entry, "held")
        if os.path.exists(manifest_path) and os.path.exists(held_path):
            manifest = json.load(open(manifest_path))
            held = open(held_path, "rb").read()
            total = sum(c["len"] for c, h in zip(manifest["chunks"], held) if h == 1)
            return total, os.path.getsize(manifest_path)
    raise RuntimeError(f"no store entry in {store}")


def scenario_one_holder(rate):
    lab = Lab([rate, rate, rate])
    homes = [tempfile.mkdtemp(prefix="exo-lan-") for _ in range(3)]
    try:
        lab.start(0, homes[0], MODEL_PATH, "80MiB", [])
        wait_for(homes[0], "shard service at")
        started = time.time()
        lab.start(1, homes[1], MODEL_ID, "80MiB", [0])
        lab.start(2, homes[2], MODEL_ID, "80MiB", [0, 1])
        for h in homes:
            wait_for(h, "3 stage(s)")
            wait_for(h, "exo-node: ready")
        lab.chat(2)
        first_answer = time.time() - started
        print(f"## 3 nodes, one holding {MODEL_ID}, every link {rate} Mbit/s\n")
        print(f"- from starting the two empty nodes to the first answer (through one of "
              f"them): {first_answer:.2f} s")
        for i in (1, 2):
            got, seconds, what = fetched(homes[i])
            header = received_total(homes[i]) - got
            held, manifest = held_bytes(homes[i])
            print(f"- node {i}: received {received_total(homes[i]):,} bytes of chunks "
                  f"({what}: {got:,} + the file's header {header:,}) = the chunks it "
                  f"holds: {held:,} ({'equal' if held == received_total(homes[i]) else 'DIFFERENT'})"
                  f"; plus the manifest, {manifest:,} bytes; layers in {seconds:.2f} s = "
                  f"{got * 8 / seconds / 1e6:.1f} Mbit/s")
        # Both fetched at once through the holder's one capped link.
        fetches = [fetched(homes[i]) for i in (1, 2)]
        total = sum(f[0] for f in fetches)
        span = max(f[1] for f in fetches)
        print(f"- the holder's link carried {total * 8 / span / 1e6:.1f} Mbit/s while both "
              f"fetched ({100 * total * 8 / span / 1e6 / rate:.0f} % of its {rate} Mbit/s cap)\n")
    finally:
        lab.close()
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)


def scenario_sources(rate, sources):
    caps = [rate] * sources + [rate * 4]
    lab = Lab(caps)
    homes = [tempfile.mkdtemp(prefix="exo-lan-") for _ in caps]
    fetcher = len(caps) - 1
    try:
        lab.start(0, homes[0], MODEL_PATH, "120MiB", [])
        wait_for(homes[0], "shard service at")
        if sources == 2:
            # Too little memory for layers: a source only, so the split stays the same.
            lab.start(1, homes[1], MODEL_PATH, "8MiB", [0])
            wait_for(homes[1], "shard service at")
        lab.start(fetcher, homes[fetcher], MODEL_ID, "120MiB", list(range(sources)))
        wait_for(homes[fetcher], "exo-node: ready", within=600)
        got, seconds, _ = fetched(homes[fetcher])
        return got, seconds
    finally:
        lab.close()
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)


def main():
    global EXE, MODEL_PATH, MODEL_ID
    EXE = os.path.abspath(sys.argv[1])
    MODEL_PATH = os.path.abspath(sys.argv[2])
    MODEL_ID = os.path.basename(MODEL_PATH).removesuffix(".gguf")
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 100
    scenario_one_holder(rate)
    one = scenario_sources(rate, 1)
    two = scenario_sources(rate, 2)
    print(f"## One source against two (sources' links {rate} Mbit/s, the fetcher's "
          f"{rate * 4:.0f})\n")
    print(f"- 1 source: {one[0]:,} bytes in {one[1]:.2f} s = {one[0] * 8 / one[1] / 1e6:.1f} "
          f"Mbit/s ({100 * one[0] * 8 / one[1] / 1e6 / rate:.0f} % of the cap)")
    print(f"- 2 sources: {two[0]:,} bytes in {two[1]:.2f} s = {two[0] * 8 / two[1] / 1e6:.1f} "
          f"Mbit/s")
    print(f"- 2 sources take {two[1] / one[1]:.2f}x the time of 1")


if __name__ == "__main__":
    main()
