"""On 2 ranks with trainer.sequence_parallel=2, one forward and backward through the DeepSpeed engine
of a batch of whole sequences, for each case of --cases; rank 0 writes, per case, the loss and each
parameter's whole gradient (gathered from the ZeRO partitions), with the same batch and the same
model's loss and gradients on one process without any parallelism (fp32) to compare them with."""

import argparse
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from fusion_train.model.chameleon import Chameleon
from fusion_train.train.config import load_config
from fusion_train.train.engine import build_engine, build_model
from fusion_train.train.run import single_process_environment
from fusion_train.train.sequence_parallel import SequenceParallel
from fusion_train.vocab import Modality

SEQ_LEN, BATCH, IMAGE_IDS = 64, 2, [1000, 3000]
CASES = {  # name -> overrides on the tiny model (GQA: 4 heads, 2 key/value heads)
    "zero0": ["deepspeed.zero_stage=0"],
    "zero1_documents": ["deepspeed.zero_stage=1", "data.document_mask=true"],
    "zero3_documents": ["deepspeed.zero_stage=3", "data.document_mask=true"],
    "zero1_one_kv_head": ["deepspeed.zero_stage=1", "model.n_kv_heads=1"],
    "zero3_untied_flex_documents": [
        "deepspeed.zero_stage=3", "data.document_mask=true", "model.attention=flex",
        "model.untie_modalities=[attention,ffn,norms,qk_norm]", f"model.image_token_ids={IMAGE_IDS}",
    ],
    "zero2_checkpointed": ["deepspeed.zero_stage=2", "trainer.activation_checkpointing=true"],
    "zero1_compiled": ["deepspeed.zero_stage=1", "trainer.compile=true"],  # by --cases only: 42 s on a CPU, not in CI
}  # fmt: skip


def batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 4000, (BATCH, SEQ_LEN), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = -100  # no loss on a prompt
    labels[0, SEQ_LEN // 2] = -100  # nor at the first target of the second part
    doc_ids = torch.cumsum(torch.rand(BATCH, SEQ_LEN, generator=generator) < 0.08, dim=1)
    modality = torch.where((labels >= IMAGE_IDS[0]) & (labels < IMAGE_IDS[1]), Modality.IMAGE, Modality.TEXT)
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids, "label_modality": modality}


def run_case(name: str, overrides: list[str], sequence: SequenceParallel) -> dict:
    cfg = load_config(["model=tiny", f"data.seq_len={SEQ_LEN}", f"data.micro_batch_size={BATCH}",
                       f"trainer.global_batch_tokens={SEQ_LEN * BATCH}", "model.dropout=0.0", *overrides])  # fmt: skip
    data = batch(seed=len(name))
    doc_ids = data["doc_ids"] if cfg.data.document_mask else None

    reference_model = Chameleon(cfg.model, seed=cfg.trainer.seed)
    reference = reference_model(data["input_ids"], labels=data["labels"], doc_ids=doc_ids,
                                label_modality=data["label_modality"])  # fmt: skip
    reference.loss.backward()

    engine, _, _ = build_engine(build_model(cfg, 1), cfg, 1, sequence=sequence)
    inputs = sequence.model_inputs(data["input_ids"], data["labels"], doc_ids, data["label_modality"])
    out = sequence.sequence_loss(engine(**inputs))
    engine.backward(out.loss)
    sums = {k: out[k].clone() for k in ("ce_sum_by_modality", "count_by_modality")}
    for value in sums.values():
        dist.all_reduce(value)  # each rank's part: over the group, the sequence's
    grads = {n.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", ""): safe_get_full_grad(p)
             for n, p in engine.module.named_parameters()}  # fmt: skip
    engine.destroy()
    return {
        "loss": out.loss.detach(), "reference_loss": reference.loss.detach(),
        "n_tokens": out.n_tokens, "reference_n_tokens": reference.n_tokens,
        "by_modality": sums, "reference_by_modality": {k: reference[k] for k in sums},
        "grads": grads, "reference_grads": {n: p.grad for n, p in reference_model.named_parameters()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=[c for c in CASES if c != "zero1_compiled"])
    args = parser.parse_args()
    single_process_environment()
    deepspeed.init_distributed()
    sequence = SequenceParallel.start(2, load_config(["model=tiny"]).model, {"data.seq_len": SEQ_LEN})
    results = {name: run_case(name, CASES[name], sequence) for name in args.cases}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
