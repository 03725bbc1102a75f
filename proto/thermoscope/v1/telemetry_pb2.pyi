from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentMessage(_message.Message):
    __slots__ = ("hello", "frame")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    frame: Frame
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("ack", "config")
    ACK_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    config: Config
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., config: _Optional[_Union[Config, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("job_id", "run_id", "rank", "world_size", "host", "agent_version", "protocol_version", "every", "layers", "sites", "histogram_bins", "local_rank", "node", "ranks", "pod", "gpu")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_BINS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    run_id: str
    rank: int
    world_size: int
    host: str
    agent_version: str
    protocol_version: int
    every: int
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    sites: _containers.RepeatedCompositeFieldContainer[Site]
    histogram_bins: int
    local_rank: int
    node: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    pod: str
    gpu: str
    def __init__(self, job_id: _Optional[str] = ..., run_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., host: _Optional[str] = ..., agent_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., every: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., sites: _Optional[_Iterable[_Union[Site, _Mapping]]] = ..., histogram_bins: _Optional[int] = ..., local_rank: _Optional[int] = ..., node: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ..., pod: _Optional[str] = ..., gpu: _Optional[str] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "shape", "numel", "dtype", "shard", "histogram_lo", "histogram_hi")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_LO_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_HI_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    numel: int
    dtype: str
    shard: Shard
    histogram_lo: float
    histogram_hi: float
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., numel: _Optional[int] = ..., dtype: _Optional[str] = ..., shard: _Optional[_Union[Shard, _Mapping]] = ..., histogram_lo: _Optional[float] = ..., histogram_hi: _Optional[float] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("index", "count", "span")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    span: int
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., span: _Optional[int] = ...) -> None: ...

class Site(_message.Message):
    __slots__ = ("name", "kind", "function")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    function: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., function: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("seq", "step", "wall_time", "energy", "layers", "sites", "energy_ranks", "ranks")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_RANKS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    step: int
    wall_time: float
    energy: float
    layers: LayerColumns
    sites: SiteColumns
    energy_ranks: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., energy: _Optional[float] = ..., layers: _Optional[_Union[LayerColumns, _Mapping]] = ..., sites: _Optional[_Union[SiteColumns, _Mapping]] = ..., energy_ranks: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class LayerColumns(_message.Message):
    __slots__ = ("count", "mean", "m2", "grad_dot_before", "grad_dot_after", "histogram", "update_sq")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    M2_FIELD_NUMBER: _ClassVar[int]
    GRAD_DOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    GRAD_DOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SQ_FIELD_NUMBER: _ClassVar[int]
    count: bytes
    mean: bytes
    m2: bytes
    grad_dot_before: bytes
    grad_dot_after: bytes
    histogram: bytes
    update_sq: bytes
    def __init__(self, count: _Optional[bytes] = ..., mean: _Optional[bytes] = ..., m2: _Optional[bytes] = ..., grad_dot_before: _Optional[bytes] = ..., grad_dot_after: _Optional[bytes] = ..., histogram: _Optional[bytes] = ..., update_sq: _Optional[bytes] = ...) -> None: ...

class SiteColumns(_message.Message):
    __slots__ = ("count", "in_mean", "in_m2", "out_mean", "out_m2", "probe_spread")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IN_MEAN_FIELD_NUMBER: _ClassVar[int]
    IN_M2_FIELD_NUMBER: _ClassVar[int]
    OUT_MEAN_FIELD_NUMBER: _ClassVar[int]
    OUT_M2_FIELD_NUMBER: _ClassVar[int]
    PROBE_SPREAD_FIELD_NUMBER: _ClassVar[int]
    count: bytes
    in_mean: bytes
    in_m2: bytes
    out_mean: bytes
    out_m2: bytes
    probe_spread: bytes
    def __init__(self, count: _Optional[bytes] = ..., in_mean: _Optional[bytes] = ..., in_m2: _Optional[bytes] = ..., out_mean: _Optional[bytes] = ..., out_m2: _Optional[bytes] = ..., probe_spread: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "durable")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    durable: int
    def __init__(self, seq: _Optional[int] = ..., durable: _Optional[int] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("every", "paused", "max_frame_rate", "protocol_version")
    EVERY_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_RATE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    every: int
    paused: bool
    max_frame_rate: float
    protocol_version: int
    def __init__(self, every: _Optional[int] = ..., paused: _Optional[bool] = ..., max_frame_rate: _Optional[float] = ..., protocol_version: _Optional[int] = ...) -> None: ...
