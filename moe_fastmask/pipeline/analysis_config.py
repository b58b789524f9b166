"""The settings of ``moe-fastmask analyze`` (:class:`AnalysisConfig`); each field with its flag's help text.

Kept apart from :mod:`~moe_fastmask.pipeline.analyze` so that the command line is built without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_fastmask.pipeline.batching import check_batch_mix
from moe_fastmask.pipeline.common import DTYPES
from moe_fastmask.pipeline.data import DEFAULT_SYSTEM_PROMPT
from moe_fastmask.pipeline.generation.base import COMPILE_CHOICES, DEFAULT_BACKEND, backend_names, check_engine_compile
from moe_fastmask.pipeline.judge import Judge

DEFAULT_REFUSAL_TEXT = "I'm sorry, but I can't help with that."
COUNT_TOKENS = {"generated": ("decode",), "prompt": ("prefill",), "all": ("prefill", "decode")}

_IO, _DATA, _GEN, _RUN = "input and output", "data and batching", "generation and counting", "runtime"


@dataclass
class AnalysisConfig:
    """Settings of one analysis run (the flags of ``moe-fastmask analyze``)."""

    model: str | None = field(default=None, metadata={
        "help": "model directory or hub id (loaded with from_pretrained)", "group": _IO,
        "aliases": ["--model_name", "--model-name", "--model_name_or_path"]})
    data: str | None = field(default=None, metadata={
        "help": "JSON list of records {id, goal, all_prompt, judge_success_gpt4}", "group": _IO})
    out: str = field(default="analysis_out", metadata={
        "help": "output directory; re-running the same command there resumes", "group": _IO, "required": True})
    demo: bool = field(default=False, metadata={
        "help": "build a tiny random OLMoE and a synthetic dataset under OUT/demo/ and analyze them (no --model, "
                "--data)", "group": _IO})
    batch_size: int = field(default=16, metadata={
        "help": "prompts per batch, safe and jailbreak together; times --safe-ratio must be a whole number",
        "group": _DATA})
    safe_ratio: float = field(default=0.5, metadata={
        "help": "share of safe prompts per batch (0.5: each batch holds both forms of its records)", "group": _DATA})
    num_batches: int | None = field(default=None, metadata={
        "help": "batches to run (default: as many as the data fills)", "group": _DATA})
    seed: int = field(default=0, metadata={"help": "seed of the split, the batch order and sampling", "group": _DATA})
    test_fraction: float = field(default=0.2, metadata={
        "help": "share of records held out for evaluate (split_<slug>.json), in [0, 1)", "group": _DATA})
    only_successful: bool = field(default=False, metadata={
        "help": "use only records with judge_success_gpt4 == 1", "group": _DATA})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={
        "help": "system message of the safe prompts", "group": _DATA})
    # sampling, like vLLM's SamplingParams: temperature 0 is greedy
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per prompt, at most", "group": _GEN})
    min_new_tokens: int = field(default=0, metadata={
        "help": "tokens generated per prompt, at least (0 .. --max-new-tokens)", "group": _GEN})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 = greedy", "group": _GEN})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling share, in (0, 1]", "group": _GEN})
    count_tokens: str = field(default="generated", metadata={
        "help": "which tokens' routing is counted: generated, prompt, or all", "choices": sorted(COUNT_TOKENS),
        "group": _GEN})
    filter_pairs: bool = field(default=False, metadata={
        "help": "count only pairs whose plain goal was refused and whose jailbreak was not", "group": _GEN})
    refusal_text: str = field(default=DEFAULT_REFUSAL_TEXT, metadata={
        "help": "SFT target of a jailbreak whose plain goal was not refused", "group": _GEN})
    top_n: int = field(default=10, metadata={
        "help": "size of each batch's top list, for the stability count (top_count)", "group": _GEN})
    keep_token_experts: bool = field(default=True, metadata={
        "help": "keep each token's chosen experts", "negative": "--no-token-experts",
        "negative_help": "do not keep each token's chosen experts (smaller batch_outputs; no --filter-pairs)",
        "group": _GEN})
    engine: str = field(default=DEFAULT_BACKEND, metadata={
        "help": "generation backend", "choices": list(backend_names()), "group": _RUN})
    engine_compile: str = field(default="auto", metadata={
        "help": "torch.compile the decode step of --engine graph before capturing it (faster steps, a compile of "
                "about half a minute first): auto = on CUDA where torch.compile works and the run decodes enough to "
                "repay the compile (about 6 M prompt x new-token steps), never on CPU; a step that fails to compile "
                "runs uncompiled", "choices": list(COMPILE_CHOICES), "group": _RUN})
    gpu_batch_size: int | None = field(default=None, metadata={
        "help": "sequences per generation request, at least --batch-size: whole method batches (--batch-size each) are "
                "packed into one, "
                "each (batch, kind) counted in its own group, so the results equal one batch at a time; default: from "
                "free memory on CUDA with --engine graph (the batches spread evenly over at least two requests, so "
                "that judging and saving one overlaps generating the next), else one batch of --batch-size (no "
                "packing)",
        "group": _RUN})
    device: str | None = field(default=None, metadata={
        "help": "cuda or cpu (default: cuda if available, one process per GPU: the GPU of LOCAL_RANK)",
        "group": _RUN})
    dtype: str = field(default="auto", metadata={
        "help": "model dtype; auto: bfloat16 on cuda, float32 on cpu", "choices": list(DTYPES), "group": _RUN})
    overwrite: bool = field(default=False, metadata={
        "help": "delete the run of this model found in --out (any settings) and start over; without it a matching "
                "run resumes and a different one is refused", "group": _IO})
    progress: bool = field(default=True, metadata={
        "help": "show progress bars", "negative": "--no-progress", "negative_help": "no progress bars",
        "group": _RUN})
    verbose: bool = field(default=True, metadata={
        "help": "print what each step does", "negative": "--quiet",
        "negative_help": "print only errors and warnings (no progress bars either)", "group": _RUN})
    judge: Judge | None = field(default=None, repr=False, metadata={"cli": False})  # API only: a callable str -> bool
    # API only: judge, build the batch records and write the per-batch files of one generation request in a background
    # thread while the next one generates (the same records and files either way)
    overlap: bool = field(default=True, metadata={"cli": False})

    def validate(self) -> None:
        """Raise ValueError naming the setting when the settings cannot make a run."""
        if self.demo and (self.model or self.data):
            raise ValueError(
                "--demo builds its own model and data under OUT/demo/; drop --model/--data "
                "(or reuse them: --model OUT/demo/model --data OUT/demo/data.json)"
            )
        if not self.demo and (not self.model or not self.data):
            raise ValueError("give --model and --data, or --demo")
        if self.count_tokens not in COUNT_TOKENS:
            raise ValueError(f"count_tokens must be one of {sorted(COUNT_TOKENS)}, got {self.count_tokens!r}")
        if self.engine not in backend_names():
            raise ValueError(f"engine must be one of {backend_names()}, got {self.engine!r}")
        check_engine_compile(self.engine, self.engine_compile)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.count_tokens == "generated" and self.max_new_tokens < 2:
            raise ValueError(
                "count_tokens='generated' counts generated tokens as they are fed back to the model, so the last "
                "one never is: max_new_tokens must be >= 2"
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens] (--min-new-tokens), got {self.min_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need a finite temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1) (--test-fraction), got {self.test_fraction!r}")
        if self.filter_pairs and not self.keep_token_experts:
            raise ValueError("filter_pairs recomputes counts from per-sample counts; it needs keep_token_experts")
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1 (--top-n), got {self.top_n!r}")
        if self.num_batches is not None and self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 (--num-batches), got {self.num_batches!r}")
        if self.gpu_batch_size is not None and (
            isinstance(self.gpu_batch_size, bool) or not isinstance(self.gpu_batch_size, int) or self.gpu_batch_size < 1
        ):
            raise ValueError(f"gpu_batch_size must be a positive integer (--gpu-batch-size), got {self.gpu_batch_size!r}")
        if self.gpu_batch_size is not None and self.gpu_batch_size < self.batch_size:
            raise ValueError(
                f"gpu_batch_size (--gpu-batch-size) packs whole batches into one generation request, so it must be at "
                f"least batch_size (--batch-size, {self.batch_size}), got {self.gpu_batch_size}")
        check_batch_mix(self.batch_size, self.safe_ratio)  # before anything is written, demo included

    @property
    def do_sample(self) -> bool:
        """True when generation samples (temperature > 0); greedy otherwise."""
        return self.temperature > 0


__all__ = ["COUNT_TOKENS", "DEFAULT_REFUSAL_TEXT", "AnalysisConfig"]
