"""Issue 23 item 4, as an attacker plays it: what one forged frame does to a real agent's run.

A collector process on loopback with a database (checkpoints every 0.1 s). A real agent streams
10 frames of (job, run, rank 0); a second stream of the same (run, rank) sends one frame of seq
2^63-1 at step 2^62, from the same identity (`--token` none) or another token allowed the job
(`--tokens`); the real agent sends 20 more frames. Then the collector restarts on its database,
and a worker restarted under the run (seq from 1) sends 5 frames past the real last step.

Prints: whether the forged hello and frame were taken, the real frames received and counted
duplicate, the highest durable mark the real agent was told, the job's last step before and
after the restart, and how many of the restarted worker's frames merged.

    PYTHONPATH=tests python tests/bench/forged_frame.py [--tokens]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc

from thermoscope.wire.codec import MAX_SEQ

from helpers.metrics import scrape
from helpers.processes import start_collector_process
from helpers.protocol import OpenStream, frame, hello
from helpers.security import TOKEN_A, TOKEN_ANY

JOB = "teamA-job"


def metric(url: str, name: str) -> float:
    return scrape(url).get((f"thermoscope_{name}", frozenset({("job_id", JOB)})), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", action="store_true", help="the forger holds another token for the job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db, options = Path(tmp) / "events.db", ["--checkpoint-interval", "0.1"]
        real_meta = forged_meta = None
        if args.tokens:
            tokens = Path(tmp) / "tokens"
            tokens.write_text(f"{TOKEN_A} teamA\n{TOKEN_ANY} teamA\n")
            options += ["--tokens", str(tokens)]
            real_meta = (("authorization", f"Bearer {TOKEN_A}"),)
            forged_meta = (("authorization", f"Bearer {TOKEN_ANY}"),)
        c = start_collector_process(db, None, *options)
        real = OpenStream(c.grpc_target, hello(JOB), metadata=real_meta)
        durable = 0
        for seq in range(1, 11):
            real.send(frame(seq, seq))
            durable = max(durable, real.reply().ack.durable)
        forged = "refused at its hello"
        try:
            forger = OpenStream(c.grpc_target, hello(JOB), metadata=forged_meta)
            forged = "refused"
            forger.send(frame(MAX_SEQ, 1 << 62))
            forged = f"taken (acked {forger.reply().ack.seq})"
            time.sleep(0.5)  # a checkpoint holds it
            forger.close()
        except EOFError:
            pass
        for seq in range(11, 31):
            real.send(frame(seq, seq))
            durable = max(durable, real.reply().ack.durable)
        real.close()
        time.sleep(0.5)
        received = metric(c.metrics_url, "frames_received_total")
        duplicate = metric(c.metrics_url, "frames_duplicate_total")
        last = metric(c.metrics_url, "last_step")
        c.stop()
        c = start_collector_process(db, None, *options)
        worker = OpenStream(c.grpc_target, hello(JOB), metadata=real_meta)
        for seq in range(1, 6):
            worker.send(frame(seq, 30 + seq))
            worker.reply()
        worker.close()
        time.sleep(0.5)
        after = metric(c.metrics_url, "last_step")
        c.stop()
    print(f"forged frame: {forged}")
    print(f"real agent: frames received {received:.0f}, duplicate {duplicate:.0f}, ", end="")
    print(f"told durable up to {durable}")
    print(f"last step {last:.4g}; after a restart and a worker's 5 frames (steps 31-35): {after:.4g}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as exc:
        raise SystemExit(f"unexpected gRPC error: {exc}") from None
