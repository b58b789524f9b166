"""Run in its own process by ``test_vllm_backend.py`` (one vLLM engine per process): analyze and evaluate through
vLLM on a Qwen2-MoE whose first layer is dense, against the transformers engine. Usage: ``python
vllm_dense_layers_check.py WORKDIR``; exits non-zero with the difference on a mismatch."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from moe_fastmask.pipeline import evaluate as ev  # noqa: E402
from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis  # noqa: E402
from moe_fastmask.pipeline.demo import build_demo_dataset, build_offline_tokenizer  # noqa: E402
from moe_fastmask.pipeline.generation import vllm as vb  # noqa: E402
from moe_fastmask.pipeline.selection import ExpertSelection  # noqa: E402


def build_model(path: Path) -> Path:
    tokenizer = build_offline_tokenizer()
    config = transformers.Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=256, num_attention_heads=4, num_key_value_heads=4,  # head_dim 64
        max_position_embeddings=512, num_hidden_layers=3, mlp_only_layers=[0], num_experts=8, num_experts_per_tok=2,
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, norm_topk_prob=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():  # decisive routing: random tiny routers are near-uniform
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(work: Path) -> None:
    model = build_model(work / "model")
    data = build_demo_dataset(work / "data.json", num_records=10, seed=0)
    common = dict(model=str(model), data=str(data), batch_size=4, num_batches=2, max_new_tokens=8, device="cpu",
                  dtype="float32", progress=False, verbose=False)
    hf = run_analysis(AnalysisConfig(out=str(work / "hf"), **common))
    vllm = run_analysis(AnalysisConfig(out=str(work / "vllm"), engine="vllm", **common))
    assert len(hf.risk_diff) == 2 * 8, hf.risk_diff  # the two MoE layers only
    pd.testing.assert_frame_equal(hf.risk_diff.reset_index(drop=True), vllm.risk_diff.reset_index(drop=True))
    backend = vb.VLLMBackend(vb._ENGINE["llm"])
    assert (backend.num_layers, backend.moe_layers) == (2, [1, 2]), (backend.num_layers, backend.moe_layers)

    # steering over the MoE layers: the same answers as the transformers engine
    busiest = hf.risk_diff.sort_values("risk_diff").head(3)
    selection = ExpertSelection(num_layers=2, num_experts=8, top_k=2, masked_layers=[],
                                experts=[(int(r.layer), int(r.expert)) for r in busiest.itertuples()])
    selection.save(work / "expert_selection.json")
    answers = {}
    for engine in ("hf", "vllm"):
        args = ev.EvaluationArguments(data=str(data), base_model=str(model), selection=str(work /
                                      "expert_selection.json"), split="all", max_new_tokens=6, batch_size=4,
                                      device="cpu", dtype="float32", engine=engine, out=str(work / f"ev_{engine}"))
        answers[engine] = ev.evaluate(args, judge=lambda text: len(text) % 2 == 0, progress=False).answers
    assert set(answers["vllm"]["condition"]) == {"before", "steering"}
    pd.testing.assert_frame_equal(answers["vllm"], answers["hf"])
    print("dense-layer check: ok")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(Path(sys.argv[1]))
