"""One rank of ``moe-fastmask train`` under a launcher, instrumented for ``tests/test_distributed_train.py``.

Usage: ``accelerate launch ... tests/distributed_train_worker.py REPORT_DIR [--fsdp2] -- <moe-fastmask train args>``.
Runs the real CLI, and writes ``REPORT_DIR/rank<R>.json``: the groups of every batch this rank trained on, how often
it saved the final model, its routing shares, and (unsharded models) which weights of its own in-memory model changed
relative to the base model (per expert row of the fused expert tensors) with a digest of all its weights.

``--fsdp2``: accelerate turns FSDP on for GPU processes only; this flag lifts that gate after the Trainer has built
its accelerator (distributed type FSDP, an FSDP2 plugin wrapping the decoder layers, full state dicts), so the
Trainer's FSDP2 path — ``fully_shard``, gathered saving, resuming — runs on CPU processes over Gloo.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def _changes(model, base) -> tuple[list, list, str]:
    """``(changed expert rows [layer, tensor, expert], other changed keys, digest of every weight)``."""
    rows, others = [], []
    digest = hashlib.sha256()
    reference = base.state_dict()
    for key, value in sorted(model.state_dict().items()):
        value = value.detach().cpu()
        digest.update(key.encode())
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
        before = reference[key]
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            layer = int(key.split(".")[2])
            name = key.rsplit(".", 1)[1]
            rows += [[layer, name, e] for e in range(value.shape[0]) if not torch.equal(value[e], before[e])]
        elif not torch.equal(value, before):
            others.append(key)
    return rows, others, digest.hexdigest()


def _force_fsdp2() -> None:
    import transformers
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    create = transformers.Trainer.create_accelerator_and_postprocess

    def create_with_fsdp2(self):
        create(self)
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["OlmoeDecoderLayer"], state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True, cpu_ram_efficient_loading=False,
        )  # fmt: skip
        self.accelerator.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    transformers.Trainer.create_accelerator_and_postprocess = create_with_fsdp2


def main(argv: list[str]) -> int:
    report_dir, options, cli_args = Path(argv[0]), argv[1 : argv.index("--")], argv[argv.index("--") + 1 :]
    if "--fsdp2" in options:
        _force_fsdp2()
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from moe_fastmask import cli
    from moe_fastmask.pipeline import train as tr

    seen, saves, results = [], [], []
    collate = tr.MaskedSFTCollator.__call__

    def recording_collate(self, features):
        batch = collate(self, features)
        seen.append(batch["groups"].tolist())
        return batch

    save_pretrained = PreTrainedModel.save_pretrained

    def counting_save(self, save_directory, *args, **kwargs):
        if Path(save_directory).name == tr.FINAL_MODEL_DIR:
            saves.append(str(save_directory))
        return save_pretrained(self, save_directory, *args, **kwargs)

    train = tr.train

    def keeping_train(*args, **kwargs):
        results.append(train(*args, **kwargs))
        return results[-1]

    tr.MaskedSFTCollator.__call__ = recording_collate
    PreTrainedModel.save_pretrained = counting_save
    tr.train = keeping_train
    rc = cli.main(["train", *cli_args])

    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "rc": rc, "batches": seen,
              "final_saves": saves}  # fmt: skip
    if results:
        result = results[-1]
        model = result.trainer.model
        if not any(type(p).__name__ == "DTensor" for p in model.parameters()):  # sharded: see the saved model
            base = AutoModelForCausalLM.from_pretrained(result.config["base_model"], dtype=torch.float32)
            rows, others, digest = _changes(model, base)
            report.update(changed_rows=rows, changed_other=others, digest=digest)
        shares = tr.RoutingStatsCallback(None, result.selection).shares(result.routing_totals)
        report.update(selected=[list(pair) for pair in result.selection.experts], config=result.config,
                      trainer_world_size=result.trainer.args.world_size, routing_shares=shares)  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
