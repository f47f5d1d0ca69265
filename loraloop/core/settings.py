"""Settings shared by the server and the learner: one class, `LORALOOP_` env prefix."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "LORALOOP_"

Engine = Literal["hf", "vllm"]
Bandit = Literal["thompson", "linucb"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
# The default request_id_secret, and the chart's placeholder: public, so refused (like an
# empty secret) while auth_required is set.
DEV_SECRET = "loraloop-dev-secret"
PUBLISHED_SECRETS = frozenset({DEV_SECRET, "change-me"})
FeedbackAggregation = Literal["earliest", "sum"]
PreferenceLearning = Literal["reward", "preference", "both"]
PreferenceSource = Literal["regenerate", "edit"]
PREFERENCE_SOURCES: tuple[PreferenceSource, ...] = ("regenerate", "edit")

# LORALOOP_* variables that are not settings of the server or the learner: the Python
# client's own (loraloop/client.py) and the fault-injection hooks of the crash tests.
OTHER_ENV = frozenset(
    {
        "API_KEY",
        "TLS_CA_FILE",
        "TLS_CLIENT_CERT_FILE",
        "TLS_CLIENT_KEY_FILE",
        "FAULT_PAUSE_AT",
        "FAULT_MARKER",
    }
)


class StartupError(Exception):
    """A configuration a person must fix, found at start-up: `serve` and `learn` end with
    its message on one line and exit code 2. Each such error derives from this."""


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "loraloop"


class Settings(BaseSettings):
    """Configuration of one loraloop process (server or learner).

    Every field can be set from the environment as `LORALOOP_<FIELD>` or from a `.env` file.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    # --- model -----------------------------------------------------------------------------
    model: str = Field(
        "",
        description="Base model: a local Hugging Face model directory or a hub name in the "
        "local cache. Required by `serve` and `learn`; `loraloop build-model` builds the "
        "demo's tiny Llama and prints its directory.",
    )
    model_id: str = Field(
        "",
        description="Id of the base model, recorded in events and adapters; defaults to "
        "`model` as written. Servers refuse adapter versions of another id and the learner "
        "skips interactions of another id: give servers and learner the same one.",
    )
    device: Device = Field(
        "auto",
        description="Where the hf engine and the learner run the base model, the LoRA bank, "
        "the batched step and sampling: 'cuda', 'cpu', or 'auto' (cuda when "
        "torch.cuda.is_available(), else cpu). 'cuda' on a machine without CUDA stops "
        "`serve`/`learn` at start-up. The vllm engine runs where vLLM's platform is.",
    )
    dtype: DType = Field(
        "auto",
        description="torch dtype of the base model and the LoRA bank: float32, bfloat16, "
        "float16, or 'auto': bfloat16 on CUDA, float32 on the CPU. The learner's optimiser "
        "keeps its weights in float32 whatever this is; adapters are stored in float32.",
    )
    lora_rank: int = Field(8, ge=1, le=256, description="Rank of every per-user LoRA adapter.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; scaling is alpha / rank.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the Linear modules that carry LoRA weights.",
    )

    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    topic_interactions: str = Field("interactions", description="Topic of Interaction events.")
    topic_feedback: str = Field("feedback", description="Topic of Feedback events.")
    topic_adapter_updates: str = Field(
        "adapter-updates", description="Compacted topic of AdapterUpdated events (key=user_id)."
    )
    kafka_connect_timeout: float = Field(
        10.0, gt=0, description="Seconds to wait for Kafka when connecting at start-up."
    )
    topic_bandit_state: str = Field(
        "bandit-state", description="Compacted topic of per-user bandit statistics."
    )
    topic_dead_letter: str = Field(
        "dead-letter",
        description="Topic where the learner forwards events it cannot read (with headers "
        "naming their source topic/partition/offset and the error).",
    )
    topic_partitions: int = Field(4, ge=1, description="Partitions of each topic when created.")
    kafka_replication_factor: int = Field(
        1,
        ge=1,
        le=32767,
        description="Replicas of each topic the learner creates (1 suits the single local "
        "broker of `loraloop kafka`; production: 3). The learner refuses to start when the "
        "cluster has fewer brokers than this and a topic must be created, or when an "
        "existing topic has fewer replicas.",
    )
    kafka_min_insync_replicas: int = Field(
        1,
        ge=1,
        description="min.insync.replicas of each topic the learner creates: the replicas that "
        "must have a record before Kafka acknowledges it to the producers (acks=all), so an "
        "acknowledged event survives the loss of this many minus one brokers (production: 2 "
        "with replication factor 3). At most kafka_replication_factor.",
    )

    # --- adapter store ---------------------------------------------------------------------
    adapter_store: Path = Field(
        Path("./out/adapters"),
        description="Root of the versioned adapter store on a local or shared filesystem "
        "(used when adapter_store_uri is empty).",
    )
    adapter_store_uri: str = Field(
        "",
        description="Where the adapter versions are: file:///path (a directory, like "
        "adapter_store) or s3://bucket/prefix (any S3-compatible object store: the endpoint "
        "from AWS_ENDPOINT_URL, credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
        "the host's identity, AWS_REGION). Empty: the directory adapter_store. With S3 the "
        "learner writes there and every server fetches versions into adapter_cache_dir.",
    )
    adapter_cache_dir: Path | None = Field(
        None,
        description="With an s3:// adapter store: the local directory where this process "
        "keeps its copies of fetched versions (each user's two newest). Default: "
        "<cache_dir>/adapter-copies.",
    )
    adapter_keep_versions: int = Field(
        3,
        ge=0,
        description="Retention: each user's newest this many adapter versions are always "
        "kept; an older one is deleted by the learner once a newer version was announced "
        "at least adapter_retention_grace_seconds ago and the rollback guard cannot return "
        "to it. 0 keeps every version.",
    )
    adapter_retention_grace_seconds: float = Field(
        60.0,
        ge=0,
        description="Retention: a version is deleted only once a newer version of its user "
        "was announced (acknowledged by Kafka) at least this long ago, so every server has "
        "swapped to it; keep it above the servers' adapter-updates lag plus load time.",
    )

    # --- operations ------------------------------------------------------------------------
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the Prometheus /metrics endpoints bind (0.0.0.0 in a container).",
    )
    server_metrics_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="Port of `loraloop serve`'s Prometheus /metrics endpoint: -1 disables it, "
        "0 picks a free one (the bound port is printed at start-up).",
    )
    learner_metrics_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="Port of `loraloop learn`'s Prometheus /metrics endpoint: -1 disables it, "
        "0 picks a free one (the bound port is printed at start-up).",
    )
    log_level: LogLevel = Field(
        "WARNING",
        description="Level of the root logger of `loraloop serve` / `learn` (DEBUG, INFO, "
        "WARNING, ERROR, CRITICAL; any case); `-v` on the command line means INFO. The "
        "access log has a level of its own (access_log_level).",
    )
    access_log_level: LogLevel = Field(
        "INFO",
        description="Level of the `loraloop.access` logger, which writes one line per call "
        "(protocol, method, status code, duration, request_id/user_id) at INFO, whatever "
        "log_level is: INFO shows them beside the root logger's WARNING; WARNING or above "
        "turns them off; DEBUG also shows successful health checks (kept out of INFO: "
        "probes call every few seconds).",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where built artefacts are cached between runs (the Kafka jars and the "
        "tiny model of `loraloop kafka` / `build-model`); default $XDG_CACHE_HOME/loraloop "
        "or ~/.cache/loraloop.",
    )
    log_json: bool = Field(
        False,
        description="Log one JSON object per line (with request_id/user_id where known) "
        "instead of plain text.",
    )

    # --- server ----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="Port of the OpenAI-compatible HTTP API on `host` (/v1/chat/completions, "
        "/v1/completions, /v1/models, /v1/feedback, /health; HTTPS with the gRPC server's "
        "TLS settings), served by the same process over the same engine: -1 disables it "
        "(the default, as for the metrics ports: an upgrade opens no new listener unasked, "
        "and many servers on one host never collide on a fixed port; the Helm chart and "
        "compose file turn it on at 8000), 0 picks a free one (printed at start-up).",
    )
    engine: Engine = Field("hf", description="Engine backend: 'hf' (transformers) or 'vllm'.")
    max_batch_size: int = Field(16, ge=1, description="Most requests decoded in one batch.")
    max_prompt_tokens: int = Field(512, ge=1, description="Longest prompt accepted, in tokens.")
    max_new_tokens: int = Field(256, ge=1, description="Upper bound on a request's max_tokens.")
    max_prompt_chars: int = Field(
        100_000,
        ge=1,
        description="Longest prompt accepted, in characters (all chat messages together); "
        "checked before encoding, so an oversized prompt costs no tokenizer time.",
    )
    max_concurrent_requests: int = Field(
        256,
        ge=1,
        description="Generate/GenerateStream calls served at once (running or waiting for a "
        "batch slot); one more is refused with RESOURCE_EXHAUSTED so clients back off.",
    )
    max_message_bytes: int = Field(
        4 * 2**20,
        ge=1024,
        description="Largest gRPC request message the server reads, in bytes; a bigger one "
        "is refused with RESOURCE_EXHAUSTED.",
    )
    adapter_slots: int = Field(
        64, ge=1, description="Adapters resident in the engine at once (LRU beyond that)."
    )
    host_cache_mb: int = Field(
        2048,
        ge=1,
        description="Host-RAM budget (MiB) of loaded adapter versions, the cache tier between "
        "engine slots and the adapter store (a rank-8 q/k/v/o adapter of the tiny model is "
        "64 KiB; of a 7B Llama in bf16, 16 MiB).",
    )
    host_cache_adapters: int = Field(
        50_000, ge=1, description="Most adapter versions kept in the host-RAM cache."
    )
    vllm_max_cpu_loras: int = Field(
        1024,
        ge=1,
        description="vllm engine: adapters vLLM keeps in host RAM (max_cpu_loras); the ones "
        "in its batch (max_loras) are adapter_slots.",
    )
    vllm_kv_cache_gib: float = Field(
        1.0, gt=0, description="vllm engine on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vllm engine on a GPU: share of its memory vLLM may use."
    )
    request_id_secret: SecretStr = Field(
        SecretStr(DEV_SECRET),
        description="HMAC key binding request ids to users; set a real secret in production.",
    )

    # --- security (service/auth.py, service/tls.py) -----------------------------------------
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="API keys and the user ids each may act for: entries `KEY=SCOPES` "
        "separated by ';' or newlines; SCOPES is a comma-separated list of `*` (any user), "
        "`PREFIX*` (ids starting with PREFIX) or exact user ids; KEY is the key itself (16+ "
        "characters) or `sha256:<hex digest>` of it. Example: `k-admin-...=*;k-acme-...=acme.*`. "
        "Clients send the key as `x-api-key` (or `authorization: Bearer KEY`) metadata. "
        "Empty: no key is asked for (the local demo).",
    )
    auth_required: bool = Field(
        False,
        description="Refuse to start without api_keys (production: set true so a missing "
        "secret cannot silently open the API).",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the gRPC server; set with tls_key_file."
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of tls_cert_file; unset: plaintext gRPC."
    )
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle: when set, clients must present a certificate signed by "
        "it (mutual TLS).",
    )
    event_queue_size: int = Field(
        10_000, ge=1, description="Events buffered for Kafka before new ones are dropped."
    )
    spill_dir: Path | None = Field(
        None,
        description="Local directory of the event spill journal, where events wait on disk "
        "while Kafka is unreachable (and across restarts); unset: 'event-spill' next to "
        "the adapter store directory.",
    )
    spill_max_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Cap of the event spill journal in bytes; events beyond it are dropped "
        'and counted (loraloop_server_events_dropped_total{reason="spill_full"}).',
    )
    event_abandon_seconds: float = Field(
        5.0,
        ge=1,
        le=60,
        description="Seconds without an acknowledgement from Kafka after which the server "
        "gives up on its producer (events wait in the spill journal while a new one "
        "connects); also the producer's request timeout, so a broker that answers within "
        "it never causes duplicates.",
    )
    event_drain_seconds: float = Field(
        10.0,
        ge=0,
        description="On shutdown (after grace_seconds), how long the server keeps delivering "
        "queued and spilled events while Kafka answers; what is left stays in the spill "
        "journal for the next start on the same spill_dir.",
    )
    event_missing_topic_seconds: float = Field(
        30.0,
        ge=0,
        description="How long spilled events for a topic Kafka does not have are retried "
        "before they are dropped and counted "
        '(loraloop_server_events_dropped_total{reason="no_topic"}), so they do not hold '
        "up the journal.",
    )
    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, how long the server keeps answering every call after its "
        "health turned NOT_SERVING (Check and every open Watch), so that load balancers and "
        "readiness probes take it out of rotation before calls are refused; then "
        "grace_seconds, then event_drain_seconds. 0: refuse new calls at once. SIGINT "
        "(Ctrl-C) and a second signal skip the rest of it. Under Kubernetes keep it at least "
        "the readiness probe's periodSeconds x failureThreshold.",
    )
    grace_seconds: float = Field(
        5.0,
        ge=0,
        description="On shutdown, after drain_seconds: how long calls in flight may finish "
        "once new calls are refused; those still running then are cancelled.",
    )

    # --- bandit over response strategies -----------------------------------------------------
    arms_file: Path | None = Field(
        None,
        description="TOML file of arms (system prompts, decoding settings); unset: one "
        "no-op arm, i.e. no bandit.",
    )
    context_schema_file: Path | None = Field(
        None,
        description="TOML file declaring the bandit's context features (a version, the "
        "built-in server features on or off, named numeric and categorical [[feature]]s) "
        "that clients send in GenerateRequest.context (loraloop/core/bandits/"
        "context_schema.py). Give the server and the learner the same file. Unset: the "
        "built-in context only (bias, prompt length, conversation) and requests carrying "
        "context are refused. Statistics of another schema are kept, not used.",
    )
    bandit: Bandit = Field("thompson", description="Arm choice: 'thompson' or 'linucb'.")
    bandit_prior_strength: float = Field(
        5.0, ge=0, description="Observations the population prior is worth to a cold user."
    )
    bandit_noise: float = Field(
        0.5,
        gt=0,
        description="Thompson sampling's posterior spread, in units of the reward's standard "
        "deviation (estimated from the rewards seen, so one value serves rewards in [0, 1] and "
        "[-1, 1] alike): 1 is the Bayesian posterior, smaller is greedier.",
    )
    bandit_alpha: float = Field(
        0.5,
        ge=0,
        description="LinUCB's confidence-bound width, in units of the reward's standard "
        "deviation (estimated from the rewards seen).",
    )
    bandit_epsilon: float = Field(
        0.05, ge=0, le=1, description="LinUCB's share of uniformly random choices."
    )

    # --- learner ---------------------------------------------------------------------------
    group_id: str = Field("loraloop-learner", description="Learner consumer group.")
    learner_session_timeout_seconds: float = Field(
        10.0,
        ge=1,
        description="Kafka consumer session timeout of the learner: a learner that dies "
        "(kill -9) keeps its partitions this long before they move to a live one or its "
        "restart. The broker bounds it (group.min.session.timeout.ms, 6 s by default).",
    )
    learner_publish_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long the learner waits for Kafka to acknowledge what it published "
        "(AdapterUpdated, tombstones, bandit statistics) before committing offsets; past it "
        "the offsets wait for the next round, and refused records are sent again.",
    )
    learner_restore_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="How long the learner may take at start-up to read the compacted "
        "adapter-updates topic to its end (to rebuild deleted users); raise it for a big "
        "topic on a slow broker. Past it the learner stops with an error saying so.",
    )
    learner_deleted_users_max: int = Field(
        1_000_000,
        ge=1,
        description="Deleted users whose deletion time the learner remembers (rebuilt from "
        "adapter-updates tombstones at start-up) to drop their pre-deletion events; beyond "
        "it the oldest deletions are forgotten (counted).",
    )
    learning_rate: float = Field(2e-3, gt=0, description="Adam step size of the LoRA update.")
    kl_coef: float = Field(
        0.05, ge=0, description="Weight of the exact KL penalty to the base model."
    )
    min_batch: int = Field(1, ge=1, description="Joined samples a user needs before an update.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-user gradient-norm clip.")
    baseline_decay: float = Field(
        0.9, ge=0, lt=1, description="Decay of the per-user running-mean reward baseline."
    )
    reward_wait_seconds: float = Field(
        600.0,
        gt=0,
        description="How long an interaction waits for its feedback, from the request's "
        "start: feedback stamped later is late (Feedback answers accepted=false, the "
        "learner drops it).",
    )
    feedback_aggregation: FeedbackAggregation = Field(
        "earliest",
        description="What repeated feedback on one response does, for the server's answer "
        "(FeedbackResponse.accepted) and the learner's join alike: 'earliest' counts the "
        "first feedback only (later ones are answered accepted=false, reason 'repeated'); "
        "'sum' counts every feedback within reward_wait_seconds, their rewards added "
        "(clipped to [-1, 1]), learnt from once the window closes.",
    )
    feedback_memory: int = Field(
        100_000,
        ge=0,
        description="Request ids with feedback each server replica remembers (for "
        "feedback_aggregation='earliest', to answer a repeat with accepted=false); the "
        "oldest are forgotten beyond it, and ids whose reward window closed are not kept. "
        "A repeat beyond this memory, or sent to another replica, is acknowledged and "
        "then ignored by the learner.",
    )
    seed: int = Field(0, description="Seed of the learner's adapter initialisation.")
    reward_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Overrides of the reward function's weights (learner/rewards.py), e.g. "
        '{"thumbs": 1.0, "copied": 0.5, "dwell": 0.0} as JSON in LORALOOP_REWARD_WEIGHTS.',
    )
    default_reward: float | None = Field(
        None,
        description="Reward of an interaction whose feedback did not come within "
        "reward_wait_seconds; unset: such interactions are not learnt from.",
    )
    is_truncation: float = Field(
        2.0, ge=1, description="Per-token importance ratios are truncated at this value."
    )
    loo_baseline: bool = Field(
        True,
        description="Use the leave-one-out mean as baseline when a user has several "
        "samples in one update (RLOO).",
    )
    kl_limit: float = Field(
        2.0,
        gt=0,
        description="Rollback guard: an update whose per-token KL to the base "
        "model exceeds this is rolled back.",
    )
    guard_window: int = Field(
        16, ge=2, description="Rollback guard: rewards compared over this many samples."
    )
    guard_drop: float = Field(
        0.5,
        gt=0,
        description="Rollback guard: a fall of the windowed mean reward this "
        "large below the best window rolls the user back to the best version.",
    )
    preference_learning: PreferenceLearning = Field(
        "reward",
        description="What trains each user's LoRA adapter: 'reward' (REINFORCE on the "
        "feedback's reward; no preference pairs are formed), 'preference' (online DPO on "
        "the pairs that regenerates and edits make, learner/preferences.py; rewards still "
        "teach the bandit), or 'both' (one step on the REINFORCE loss plus dpo_weight "
        "times the DPO loss). With pairs from regenerates, the learner keeps each "
        "interaction's offset uncommitted for reward_wait_seconds, so a replay can pair it.",
    )
    preference_sources: list[PreferenceSource] = Field(
        default_factory=lambda: list(PREFERENCE_SOURCES),
        description="Which signals make preference pairs when preference_learning is not "
        "'reward': 'regenerate' (GenerateRequest.regenerates: the new response over the "
        "replaced one), 'edit' (FeedbackSignals.edited_text over the response).",
    )
    preference_max_edit_chars: int = Field(
        16_000,
        ge=1,
        description="Longest FeedbackSignals.edited_text accepted, in characters: the "
        "server refuses a longer one (INVALID_ARGUMENT), the learner skips it.",
    )
    dpo_beta: float = Field(
        0.1,
        gt=0,
        description="DPO's beta: how sharply the loss separates the chosen from the "
        "rejected response, in log-probability ratios to the base model.",
    )
    dpo_weight: float = Field(
        1.0,
        gt=0,
        description="With preference_learning='both': the weight of the DPO loss added to "
        "the REINFORCE loss (per user, each the mean over its samples or pairs).",
    )

    @field_validator("kafka_min_insync_replicas")
    @classmethod
    def _insync_within_replicas(cls, value: int, info: ValidationInfo) -> int:
        replicas = info.data.get("kafka_replication_factor")
        if isinstance(replicas, int) and value > replicas:
            raise ValueError(
                f"must be at most kafka_replication_factor ({replicas}): no write could "
                "ever be acknowledged"
            )
        return value

    @field_validator("log_level", "access_log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _real_secret_when_auth_required(self) -> Settings:
        """auth_required is production: with an empty or published request-id secret anyone
        can forge request ids for any user (the chart refuses to render them too)."""
        secret = self.request_id_secret.get_secret_value()
        if self.auth_required and (not secret.strip() or secret in PUBLISHED_SECRETS):
            what = f"the published default {secret!r}" if secret.strip() else "empty"
            raise ValueError(
                f"LORALOOP_REQUEST_ID_SECRET is {what} while LORALOOP_AUTH_REQUIRED is true: "
                "anyone could forge request ids; set a secret of your own (e.g. `openssl rand "
                "-hex 32`), or unset LORALOOP_AUTH_REQUIRED for a local demo"
            )
        return self


def default_of(name: str) -> Any:
    """The default of setting `name`, for the config objects that mirror some settings, so
    each default is written once (here)."""
    field = Settings.model_fields[name]
    return field.get_default(call_default_factory=True)


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """`LORALOOP_*` variables that no setting reads, each with the closest setting when one
    is close (a typo, or a key from a newer chart), e.g. `LORALOOP_MODLE (did you mean
    LORALOOP_MODEL?)`. Empty when every variable is known."""
    environ = os.environ if environ is None else environ
    known = {name.upper() for name in Settings.model_fields} | OTHER_ENV
    out = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var[len(ENV_PREFIX) :] in known:
            continue
        close = difflib.get_close_matches(var[len(ENV_PREFIX) :], sorted(known), n=1)
        out.append(var + (f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""))
    return out


def cache_dir() -> Path:
    """Where built artefacts (Kafka jars, the tiny model) are cached between runs
    (`Settings.cache_dir`, i.e. LORALOOP_CACHE_DIR); created if missing."""
    path = Settings().cache_dir.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
