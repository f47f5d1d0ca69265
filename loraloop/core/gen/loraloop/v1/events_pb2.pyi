from loraloop.core.gen.loraloop.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Interaction(_message.Message):
    __slots__ = ("request_id", "user_id", "timestamp_ms", "prompt", "prompt_token_ids", "response_token_ids", "behaviour_logprobs", "response_text", "adapter_version", "arm", "arm_propensity", "sampling", "model_id", "finish_reason", "context", "request_overrides", "regenerates", "context_schema")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    ARM_PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    REGENERATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    timestamp_ms: int
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    behaviour_logprobs: _containers.RepeatedScalarFieldContainer[float]
    response_text: str
    adapter_version: int
    arm: str
    arm_propensity: float
    sampling: _common_pb2.SamplingParams
    model_id: str
    finish_reason: str
    context: _containers.RepeatedScalarFieldContainer[float]
    request_overrides: _containers.RepeatedScalarFieldContainer[str]
    regenerates: str
    context_schema: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., behaviour_logprobs: _Optional[_Iterable[float]] = ..., response_text: _Optional[str] = ..., adapter_version: _Optional[int] = ..., arm: _Optional[str] = ..., arm_propensity: _Optional[float] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., model_id: _Optional[str] = ..., finish_reason: _Optional[str] = ..., context: _Optional[_Iterable[float]] = ..., request_overrides: _Optional[_Iterable[str]] = ..., regenerates: _Optional[str] = ..., context_schema: _Optional[str] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("request_id", "user_id", "timestamp_ms", "signals", "feedback_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    timestamp_ms: int
    signals: _common_pb2.FeedbackSignals
    feedback_id: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., signals: _Optional[_Union[_common_pb2.FeedbackSignals, _Mapping]] = ..., feedback_id: _Optional[str] = ...) -> None: ...

class AdapterUpdated(_message.Message):
    __slots__ = ("user_id", "version", "uri", "checksum", "base_model_id", "timestamp_ms", "metrics")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    uri: str
    checksum: str
    base_model_id: str
    timestamp_ms: int
    metrics: UpdateMetrics
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ..., uri: _Optional[str] = ..., checksum: _Optional[str] = ..., base_model_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., metrics: _Optional[_Union[UpdateMetrics, _Mapping]] = ...) -> None: ...

class UpdateMetrics(_message.Message):
    __slots__ = ("samples", "mean_reward", "mean_advantage", "loss", "grad_norm", "baseline", "kl", "rolled_back", "pairs", "preference_loss")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARD_FIELD_NUMBER: _ClassVar[int]
    MEAN_ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    samples: int
    mean_reward: float
    mean_advantage: float
    loss: float
    grad_norm: float
    baseline: float
    kl: float
    rolled_back: str
    pairs: int
    preference_loss: float
    def __init__(self, samples: _Optional[int] = ..., mean_reward: _Optional[float] = ..., mean_advantage: _Optional[float] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., baseline: _Optional[float] = ..., kl: _Optional[float] = ..., rolled_back: _Optional[str] = ..., pairs: _Optional[int] = ..., preference_loss: _Optional[float] = ...) -> None: ...

class BanditState(_message.Message):
    __slots__ = ("key", "seq", "dim", "arms", "timestamp_ms", "reward_m2", "reward_m2_n", "context_schema")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    REWARD_M2_FIELD_NUMBER: _ClassVar[int]
    REWARD_M2_N_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    key: str
    seq: int
    dim: int
    arms: _containers.RepeatedCompositeFieldContainer[ArmStatistics]
    timestamp_ms: int
    reward_m2: float
    reward_m2_n: int
    context_schema: str
    def __init__(self, key: _Optional[str] = ..., seq: _Optional[int] = ..., dim: _Optional[int] = ..., arms: _Optional[_Iterable[_Union[ArmStatistics, _Mapping]]] = ..., timestamp_ms: _Optional[int] = ..., reward_m2: _Optional[float] = ..., reward_m2_n: _Optional[int] = ..., context_schema: _Optional[str] = ...) -> None: ...

class ArmStatistics(_message.Message):
    __slots__ = ("arm", "xtx", "xtr", "pulls", "reward_sum")
    ARM_FIELD_NUMBER: _ClassVar[int]
    XTX_FIELD_NUMBER: _ClassVar[int]
    XTR_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    REWARD_SUM_FIELD_NUMBER: _ClassVar[int]
    arm: str
    xtx: _containers.RepeatedScalarFieldContainer[float]
    xtr: _containers.RepeatedScalarFieldContainer[float]
    pulls: int
    reward_sum: float
    def __init__(self, arm: _Optional[str] = ..., xtx: _Optional[_Iterable[float]] = ..., xtr: _Optional[_Iterable[float]] = ..., pulls: _Optional[int] = ..., reward_sum: _Optional[float] = ...) -> None: ...
