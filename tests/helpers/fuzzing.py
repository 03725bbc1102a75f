"""Hypothesis strategies for hostile agents, and a client that sends them to a real collector.

Shared by tests/test_fuzz.py (a deterministic, bounded run in the suite) and
tests/bench/fuzz_long.py (a long run). One *case* is one call of `Telemetry/Stream`: a list
of raw request messages (each either random bytes or a serialized, structurally valid but
hostile `AgentMessage`) sent on one stream, which must end with a status in `DEFINED`.
Hypothesis draws the structure (sizes, which column is wrong, which special values); bulk
numbers are filled by a numpy generator seeded from a drawn seed, which keeps generation
cheap enough for thousands of cases a minute.
"""

from __future__ import annotations

import math
import struct
import threading

import grpc
import numpy as np
from hypothesis import strategies as st

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import STREAM_METHOD

#: Every status a call may end with: OK and the ones the collector gives with a reason.
DEFINED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
#: Settings of the collector under fuzz: small limits, so that they are hit often.
COLLECTOR_SETTINGS = dict(
    max_message_bytes=256 << 10, max_layers=64, max_jobs=40, max_name_length=64, max_frame_rate=500.0
)

JOBS = [f"fuzz{i}" for i in range(8)]
SPECIAL = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324]
U32_EDGES = [0, 1, 2, 3, 7, 8, 64, 65, 4096, 4097, 2**31, 2**32 - 1]
I64_EDGES = [0, 1, -1, 2**62, 2**63 - 1, -(2**63)]
U64_EDGES = [0, 1, 2, 2**32, 2**63, 2**64 - 1]

NAMES = ["", "a", "layer0", "layer1", "site0", "x" * 64, "x" * 65, "é" * 40, "\x00", "__other__"]
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=80))


@st.composite
def hellos(draw) -> tuple[pb.AgentMessage, int, int, int, np.random.Generator]:
    """A hello, mostly close to valid, the (layers, sites, bins) it declares, and the generator
    that fills the rest of the case. Hypothesis draws the structure and one free-form name;
    the numbers come from a generator it seeds (drawing each costs milliseconds a case)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    odd = draw(names)  # a name from hypothesis: it goes where the case puts it
    pool = [*NAMES, odd]

    def name() -> str:
        return pool[rng.integers(len(pool))]

    def pick(common, edges):  # each field of a hello is odd in one case of ten
        return common if rng.random() < 0.9 else edges[rng.integers(len(edges))]

    if draw(st.booleans()):  # a well-formed table of n layers: the frames after it get past the hello
        n = draw(st.one_of(st.integers(1, 8), st.sampled_from([63, 64, 65, 200])))
        lo, hi = pick((-1.0, 1.0), [(0.0, 0.0), (1.0, -1.0), (-math.inf, 1.0), (math.nan, 1.0)])
        shard = pick(None, [(0, 1), (0, 2), (1, 2), (2, 2), (0, 0)])
        layers = [
            pb.Layer(
                name=f"layer{i}",
                shape=[10, 10],
                numel=100,
                dtype="float32",
                shard=None if shard is None else pb.Shard(index=shard[0], count=shard[1]),
                histogram_lo=lo,
                histogram_hi=hi,
            )
            for i in range(n)
        ]
        if rng.random() < 0.2:
            layers[rng.integers(n)].name = odd
    else:
        layers = [
            pb.Layer(
                name=name(),
                shape=[int(rng.choice(I64_EDGES)) for _ in range(rng.integers(0, 4))],
                numel=pick(100, I64_EDGES),
                dtype=name(),
                shard=None
                if rng.random() < 0.5
                else pb.Shard(index=pick(0, U32_EDGES), count=pick(1, U32_EDGES)),
                histogram_lo=pick(-1.0, SPECIAL),
                histogram_hi=pick(1.0, SPECIAL),
            )
            for _ in range(rng.integers(0, 7))
        ]
    n_sites = int(pick(rng.integers(0, 4), [64, 65]))
    sites = [pb.Site(name=f"site{i}", kind="ReLU") for i in range(n_sites)]
    if rng.random() < 0.2:
        sites.append(pb.Site(name=name(), kind=name()))
    bins = pick(8, U32_EDGES)
    msg = pb.AgentMessage(
        hello=pb.Hello(
            job_id=JOBS[rng.integers(len(JOBS))] if rng.random() < 0.8 else odd,
            run_id=pick("r1", pool),
            rank=pick(0, U32_EDGES),
            world_size=pick(1, U32_EDGES),
            host=pick("fuzz", pool),
            agent_version="fuzz",
            protocol_version=pick(1, U32_EDGES),
            every=pick(1, U32_EDGES),
            layers=layers,
            sites=sites,
            histogram_bins=bins,
            local_rank=pick(0, U32_EDGES),
            node=pick("", pool),
        )
    )
    return msg, len(layers), len(sites), bins, rng


LAYER_F64 = ("mean", "m2", "grad_dot_before", "grad_dot_after")
SITE_F64 = ("in_mean", "in_m2", "out_mean", "out_m2", "probe_spread")


def hostile_frame(
    rng: np.random.Generator, n_layers: int, n_sites: int, bins: int, seq: int
) -> pb.AgentMessage:
    """A frame for a hello's tables: right-sized columns with hostile values, or a broken one.

    Drawn from `rng` (seeded by hypothesis), not by hypothesis itself: a frame holds many
    numbers, and drawing each through hypothesis would cost milliseconds per case."""
    special = np.array(SPECIAL)
    noise = rng.choice([0.0, 0.0, 0.1, 1.0])

    def column(n: int, kind: str) -> bytes:
        if kind == "i64":
            return rng.choice([0, 1, 100, 100, -1, 2**63 - 1], size=n).astype("<i8").tobytes()
        values = rng.normal(size=n)
        mask = rng.random(n) < noise
        values[mask] = rng.choice(special, size=int(mask.sum()))
        return values.astype("<f8").tobytes()

    def pick(common, edges):
        return common if rng.random() < 0.7 else edges[rng.integers(len(edges))]

    layers = pb.LayerColumns(count=column(n_layers, "i64"), **{f: column(n_layers, "f64") for f in LAYER_F64})
    sites = pb.SiteColumns(count=column(n_sites, "i64"), **{f: column(n_sites, "f64") for f in SITE_F64})
    if rng.random() < 0.5 and bins <= 64 and n_layers <= 64:
        hist = rng.integers(0, 2**32, size=n_layers * (bins + 2), dtype=np.uint64).astype("<u4")
        layers.histogram = hist.tobytes()
    if rng.random() < 0.15:  # one column of the wrong length, or random bytes
        target = layers if rng.random() < 0.5 else sites
        fields = [f.name for f in target.DESCRIPTOR.fields]
        setattr(target, fields[rng.integers(len(fields))], rng.bytes(int(rng.integers(0, 64))))
    msg = pb.AgentMessage(
        frame=pb.Frame(
            seq=pick(seq, U64_EDGES),
            step=pick(seq, I64_EDGES),
            wall_time=pick(1.7e9, SPECIAL),
            layers=layers,
            sites=sites,
        )
    )
    if rng.random() < 0.8:
        msg.frame.energy = pick(1.0, SPECIAL)
    return msg


@st.composite
def hostile_streams(draw) -> list[bytes]:
    """One call's requests: a hello then frames, valid in structure, hostile in content."""
    hello, n_layers, n_sites, bins, rng = draw(hellos())
    out = [hello.SerializeToString()]
    for seq in range(1, draw(st.integers(0, 4)) + 1):
        out.append(hostile_frame(rng, n_layers, n_sites, bins, seq).SerializeToString())
    if draw(st.integers(0, 9)) == 0:
        out.insert(
            draw(st.integers(0, len(out))),
            draw(st.sampled_from([hello, pb.AgentMessage()])).SerializeToString(),
        )
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def raw_streams(draw) -> list[bytes]:
    """One call's requests as raw bytes: noise, truncated or mutated messages, odd framings."""
    good = pb.AgentMessage(
        hello=pb.Hello(job_id=JOBS[0], world_size=1, protocol_version=1)
    ).SerializeToString()
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            parts.append(draw(st.binary(max_size=256)))
        elif kind == 1:  # a field header claiming a length it does not have
            field = draw(st.sampled_from([1, 2, 9, 15]))
            parts.append(
                _varint(field << 3 | 2) + _varint(draw(st.integers(0, 2**40))) + draw(st.binary(max_size=16))
            )
        elif kind == 2:  # a real message, truncated or with a flipped byte
            data = bytearray(good)
            if data and draw(st.booleans()):
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            parts.append(bytes(data[: draw(st.integers(0, len(data)))]))
        elif kind == 3:  # deep nesting / wrong wire types
            parts.append(struct.pack("<B", draw(st.integers(0, 255))) * draw(st.integers(1, 200)))
        else:  # large messages around the size limit
            size = draw(st.sampled_from([(256 << 10) - 8, (256 << 10) + 1, 300 << 10]))
            parts.append(_varint(2 << 3 | 2) + _varint(size) + bytes(size))
    return parts


class Client:
    """Sends cases to one collector over one channel; counts the statuses the calls ended with."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.stream_stream(
            STREAM_METHOD, request_serializer=lambda b: b, response_deserializer=None
        )
        self.statuses: dict[grpc.StatusCode, int] = {}
        self.lock = threading.Lock()

    def send(self, requests: list[bytes]) -> grpc.StatusCode:
        try:
            for _ in self.call(iter(requests), timeout=20):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in DEFINED:
                raise AssertionError(f"call ended with {code}: {exc.details()}") from exc
        with self.lock:
            self.statuses[code] = self.statuses.get(code, 0) + 1
        return code

    def close(self) -> None:
        self.channel.close()


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
