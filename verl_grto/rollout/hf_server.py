"""The ``hf`` rollout backend: a Hugging Face model behind verl's rollout-server interface.

verl's agent loops talk to rollout *servers* (Ray actors) token-in / token-out,
and the hybrid actor worker pushes new weights to them through a ``ServerAdapter``
(``verl/workers/rollout/base.py`` BaseRollout). vLLM and SGLang need GPUs; this
backend serves the same interface from a plain ``transformers`` model so the
whole verl pipeline runs on CPU (tests, the tiny demo, debugging). GPU recipes
keep vllm/sglang untouched.

Three pieces, mirroring verl's vLLM backend:
- :class:`HFRolloutServer` -- the Ray actor that holds the model and generates
  (text and images: the processor turns ``image_data`` into pixel_values /
  image_grid_thw, and ``mm_token_type_ids`` make Qwen2.5-VL use its 3-D mrope
  positions, as the actor does; without them transformers silently falls back
  to 1-D positions and rollout log-probs drift from the actor's);
- :class:`HFReplica` -- launches one server per replica (``RolloutReplicaRegistry``);
- :class:`HFServerAdapter` -- lives in the actor worker; forwards weight updates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from verl_grto.batching import RequestBatcher
from verl_grto.policy.inputs import model_inputs
from verl_grto.policy.load import load_policy
from verl_grto.rollout.weight_sync import load_adapter, load_full

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
#: Requests per ``generate`` call when the rollout config names no ``max_num_seqs``.
_DEFAULT_MAX_NUM_SEQS = 256


@dataclass
class _Request:
    """One queued ``generate`` call."""

    prompt_ids: list[int]
    sampling_params: dict[str, Any]
    image_data: list[Any] | None
    max_new_tokens: int
    batch_key: tuple = field(init=False)  # requests with equal keys can share one ``generate`` call

    def __post_init__(self) -> None:
        params = tuple(sorted((k, repr(v)) for k, v in self.sampling_params.items()))
        self.batch_key = (params, self.max_new_tokens, self.image_data is not None)


class PromptTooLongError(ValueError):
    """A request's prompt leaves no room for an answer within the server's context limit."""


def _response_log_probs(
    step_logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(B, T) log-probs of the generated ``tokens`` under the raw ``step_logits`` (one (B, V) per step)
    divided by ``temperature``, one step at a time: stacking them first would hold two more
    (B, T, V) float copies at the batch's peak."""
    out = torch.empty(tokens.shape, dtype=torch.float32)
    for t, logits in enumerate(step_logits):
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        out[:, t] = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, t, None])[:, 0]
    return out


def server_actor_name(replica_rank: int) -> str:
    """The Ray actor name of a replica's server; the adapter finds its server by it."""
    job = ray.get_runtime_context().get_job_id()
    return f"verl_grto_hf_server_{job}_{replica_rank}"


class HFRolloutServer:
    """Ray actor: token-in/token-out generation with an HF model, weights updatable in place.

    Requests arrive concurrently from verl's agent loops (every sample of a batch at once). They are
    batched, as vLLM batches its running sequences: while one ``generate`` call runs, the requests
    that arrive queue up, and the next call takes up to ``max_num_seqs`` of those with the same
    sampling parameters, left-padded into one batch (one forward per token for the whole batch
    instead of one per request: the BTO buffer, validation and every rollout phase are
    generation-bound on CPU). One lock serialises the model (CPU cores are the bottleneck anyway)
    and generation runs in a worker thread so the actor's event loop keeps answering control calls.
    A request that makes its batch fail (e.g. image tokens that do not match its images) is
    retried alone, so only it fails.

    Under load (docs/reliability.md): memory is bounded by ``max_num_seqs``, not by the number of
    requests (a queued request holds only its prompt; the logits kept for its log-probs exist only
    while its batch runs); a prompt that leaves no room for an answer within :attr:`context_limit` is
    refused at once with :class:`PromptTooLongError`, before it can join a batch; a request whose
    caller went away (its task cancelled: a Ray client disconnecting or ``ray.cancel``) is dropped
    from the queue, or, if its batch is already running, its answer is discarded, and the other
    requests of that batch are answered as usual.
    """

    def __init__(self, model_path: str, rollout_config: dict[str, Any], trust_remote_code: bool = False, seed: int = 0):
        torch.set_num_threads(int(os.environ.get("VERL_GRTO_ROLLOUT_THREADS", torch.get_num_threads())))
        self.model, self.tokenizer, self.processor = load_policy(model_path, trust_remote_code)
        self.response_length = int(rollout_config["response_length"])
        self.prompt_length = int(rollout_config["prompt_length"])
        self.max_num_seqs = max(1, int(rollout_config.get("max_num_seqs") or _DEFAULT_MAX_NUM_SEQS))
        self._batcher: RequestBatcher[_Request, TokenOutput] = RequestBatcher(
            self._run_batch, self.max_num_seqs, key=lambda request: request.batch_key
        )
        self.batches_run = 0  # generate calls made (requests / batches_run = mean batch size)
        self.global_steps: int | None = None
        self._lock = threading.Lock()
        # one generation thread: batches run one at a time anyway, and glibc gives every thread that
        # allocates its own malloc arena, which keeps a batch's freed tensors: with asyncio's default
        # pool (up to 5 threads on 1 core) peak memory grew with the number of batches run
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self._generator = torch.Generator().manual_seed(seed)
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", None) or cfg
        model_max = getattr(text_cfg, "max_position_embeddings", None) or getattr(cfg, "max_position_embeddings", None)
        #: Prompt plus answer tokens a request may reach: verl's ``prompt_length + response_length``
        #: (what vLLM gets as ``max_model_len``), never more than the model's positions.
        self.context_limit = self.prompt_length + self.response_length
        if model_max:
            self.context_limit = min(self.context_limit, int(model_max))
        self._image_token_id = getattr(cfg, "image_token_id", None)
        self._video_token_id = getattr(cfg, "video_token_id", None)
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        pad = self.tokenizer.pad_token_id
        self._pad_token_id = int(pad if pad is not None else min(self._eos_ids, default=0))

    # ---- generation -------------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        """Restart the server's own sampling stream from ``seed``.

        Why: answers sampled after a reseed depend on the seed and the requests alone, not on what
        was sampled before (BTO's in-process generator, ``algorithm/bto/build.py: hf_generate_fn``,
        reseeds per dataset row so that a resumed buffer reproduces an uninterrupted one)."""
        with self._lock:
            self._generator.manual_seed(seed)

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        **kwargs: Any,
    ) -> TokenOutput:
        if video_data:
            raise NotImplementedError("the hf rollout serves text and images; video inputs are not supported")
        prompt_ids = list(prompt_ids)
        if len(prompt_ids) >= self.context_limit:
            raise PromptTooLongError(
                f"hf rollout: request {request_id}: the prompt has {len(prompt_ids)} tokens, which leaves no room"
                f" for an answer within the server's limit of {self.context_limit} tokens (rollout.prompt_length"
                f" {self.prompt_length} + rollout.response_length {self.response_length}, at most the model's"
                " max_position_embeddings); nothing was generated for it, other requests are unaffected"
            )
        request = _Request(
            prompt_ids, dict(sampling_params), image_data, self._max_new_tokens(prompt_ids, sampling_params)
        )
        return await self._batcher.submit(request)

    async def _run_batch(self, batch: list[_Request]) -> list[TokenOutput | BaseException]:
        """One batch (requests with one ``batch_key``, at most ``max_num_seqs``) on the generation thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, batch)

    def _run(self, batch: list[_Request]) -> list[TokenOutput | BaseException]:
        """Generate a batch; if it fails, each request alone, so an error reaches only the request causing it."""
        try:
            return list(self._generate_batch(batch))
        except Exception as e:  # noqa: BLE001  (returned to the caller that awaits it)
            if len(batch) == 1:
                return [e]
            return [self._run([request])[0] for request in batch]

    def _model_inputs(self, prompts: list[list[int]], images: list[list[Any]] | None) -> dict[str, torch.Tensor]:
        return model_inputs(
            prompts,
            images,
            self.processor,
            image_token_id=self._image_token_id,
            video_token_id=self._video_token_id,
            pad_token_id=self._pad_token_id,
        )

    def _max_new_tokens(self, prompt_ids: list[int], params: dict[str, Any]) -> int:
        max_new = params.get("max_tokens") or params.get("max_new_tokens")
        if max_new is None:
            max_new = min(self.response_length, self.prompt_length + self.response_length - len(prompt_ids))
        return max(1, int(max_new))

    def _generate_batch(self, batch: list[_Request]) -> list[TokenOutput]:
        """One left-padded ``generate`` call for requests that share sampling parameters and length limit."""
        params = batch[0].sampling_params
        max_new = batch[0].max_new_tokens
        temperature = float(params.get("temperature", 1.0))
        top_p = float(params.get("top_p", 1.0))
        top_k = int(params.get("top_k", -1))
        do_sample = temperature > 0
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": do_sample,
            "return_dict_in_generate": True,
            "output_logits": True,
            "pad_token_id": self._pad_token_id,
            "repetition_penalty": float(params.get("repetition_penalty", 1.0)),
        }
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0)
        with_images = batch[0].image_data is not None
        inputs = self._model_inputs(
            [r.prompt_ids for r in batch], [list(r.image_data) for r in batch] if with_images else None
        )
        width = inputs["input_ids"].shape[1]
        # transformers' sampling draws from the global RNG; fork it so the server's
        # stream is its own (reproducible per seed, unaffected by other threads).
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._generator.get_state())
            out = self.model.generate(**inputs, **gen_kwargs)
            self._generator.set_state(torch.get_rng_state())
            self.batches_run += 1
        sequences = out.sequences
        log_probs = _response_log_probs(out.logits, sequences[:, width:], temperature if do_sample else 1.0)
        del out  # its per-step logits (T x (B, V)) are the largest thing a batch holds
        outputs = []
        for row in range(len(batch)):
            tokens = sequences[row, width:].tolist()
            end = next((k + 1 for k, t in enumerate(tokens) if t in self._eos_ids), None)
            finished = end is not None
            tokens = tokens[:end]  # rows that finished early are padded after their end-of-sequence token
            outputs.append(
                TokenOutput(
                    token_ids=tokens,
                    log_probs=log_probs[row, : len(tokens)].tolist() if params.get("logprobs", True) else None,
                    stop_reason="completed" if finished or len(tokens) < max_new else "length",
                    extra_fields={"global_steps": self.global_steps},
                )
            )
        return outputs

    # ---- weights ----------------------------------------------------------------------------
    def update_weights(
        self,
        named_tensors: dict[str, torch.Tensor],
        global_steps: int | None = None,
        peft_config: dict[str, Any] | None = None,
        base_sync_done: bool = True,
    ) -> int:
        """Copy the actor's tensors into the served model; returns how many were updated.

        Names come from verl's ``get_per_tensor_param``: Hugging Face names for full and merged-LoRA
        syncs; with ``peft_config`` (a LoRA actor, ``model.lora.merge=False``) adapter tensors, loaded
        into the served model wrapped by PEFT (:mod:`verl_grto.rollout.weight_sync`). Every tensor is
        cast to the served model's dtype, and a name the served model does not have is an error, so
        a silent partial sync can never happen.
        """
        with self._lock:
            if peft_config is not None and base_sync_done:
                self.model, n = load_adapter(self.model, named_tensors, peft_config)
            else:
                n = load_full(self.model, named_tensors)
        if global_steps is not None:
            self.global_steps = global_steps
        return n

    def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # ---- control calls verl makes on every server (nothing to free on CPU) -------------------
    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        return None

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


class HFReplica(RolloutReplica):
    """One ``hf`` rollout server per replica, started as a named Ray actor."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        name = server_actor_name(self.replica_rank)
        model_path = (
            self.model_config.local_path if hasattr(self.model_config, "local_path") else self.model_config.path
        )
        server_cls = ray.remote(HFRolloutServer)
        handle = server_cls.options(
            name=name,
            num_cpus=0,
            max_concurrency=self.max_concurrency,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}},
        ).remote(
            model_path,
            {
                "response_length": self.config.response_length,
                "prompt_length": self.config.prompt_length,
                "max_num_seqs": getattr(self.config, "max_num_seqs", None),
            },
            bool(getattr(self.model_config, "trust_remote_code", False)),
            int(getattr(self.config, "seed", 0) or 0) + self.replica_rank,
        )
        await handle.set_global_steps.remote(0)  # waits for the model to load
        self.servers = [handle]
        self._server_handle = handle
        self._server_address = f"hf://{name}"


class HFServerAdapter(BaseRollout):
    """The actor worker's end of the ``hf`` rollout: pushes synced weights to its server.

    Every trainer rank iterates the weight generator (FSDP gathers are collective);
    the first rank of each replica sends the tensors.
    """

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self._is_sender = rank % world == 0
        self._server: Any = None

    def _server_handle(self) -> Any:
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None] | Iterable[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        global_steps: int | None = None,
        peft_config: dict[str, Any] | None = None,
        base_sync_done: bool = True,
        **kwargs: Any,
    ) -> None:
        """Gather the actor's tensors (every rank iterates: FSDP gathers are collective) and send them.

        ``peft_config`` / ``base_sync_done`` are verl's LoRA sync arguments
        (``verl/workers/engine_workers.py:799-806``), passed on to the server."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the hf rollout takes full named tensors, not wire_format={wire_format!r}")
        state = {}
        for name, tensor in weights:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if self._is_sender:
                state[name] = full.detach().to("cpu", copy=True)
        if self._is_sender:
            await self._server_handle().update_weights.remote(state, global_steps, peft_config, base_sync_done)
