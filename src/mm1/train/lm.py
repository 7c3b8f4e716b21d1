"""What pre-training and SFT optimise: next-token loss of the MLLM on the packed stream.

The trainer (`mm1.train.trainer`) runs the same loop for every stage; this objective supplies the
MLLM (pre-trained weights loaded, or a checkpoint's), the batches (`mm1.data.stream`), and the
loss: summed over predicted tokens and divided by their count over the *whole* step (every
micro-batch on every rank), so that accumulation and data parallelism give the loss of one big
batch; MoE auxiliary losses are added, per-source losses and expert shares are reported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm1.config import Config, ConfigError, Stage, from_saved, load
from mm1.data.packing import IGNORE
from mm1.data.stats import DataStats
from mm1.data.stream import Batch, DataStream, make_loader
from mm1.data.tokenizer import Tokenizer
from mm1.model.mllm import MLLM, MLLMOutput, lr_rule_parameters, upcycle_from_dense
from mm1.store import runs as ckpt
from mm1.store.pretrained import LM_DECODER, load_pretrained
from mm1.train.flops import StepCount, count_batch, step_flops
from mm1.train.objective import StepMetrics
from mm1.train.parallel import all_reduce_sum


def resolve_model_config(cfg: Config, vocab: int, image_id: int) -> None:
    dec = cfg.model.decoder
    if dec.vocab_size < vocab:
        raise ConfigError(f"model.decoder.vocab_size: {dec.vocab_size} is smaller than the tokenizer's {vocab} tokens")
    cfg.model.image_token_id = image_id


def export_lm_decoder(model: torch.nn.Module, cfg: Config, tok: Tokenizer, folder: Path, *, is_main: bool) -> None:
    """The decoder of a finished LM stage as a transformers Llama folder (gathered from every rank's
    shards), with the tokenizer and the trained context: what the next stage starts from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mm1.model.decoder import Decoder
    from mm1.store.hf import export_hf_decoder

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return
    decoder = Decoder(cfg.model.decoder)
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in full.items() if k.startswith("decoder.")})
    export_hf_decoder(decoder, folder, tokenizer=tok)


def record_trained_context(cfg: Config, init_from: str | None) -> None:
    """Set `model.decoder.trained_context` (in place, before the run's config is saved): the longest
    sequence this decoder will have been trained on after this stage, over its whole lineage — the
    pre-trained LLM's context (`model.decoder.init`), the stage it starts from (`--init-from`), and
    this stage's packed sequences. Evaluation counts prompts that run past it."""
    inherited = cfg.model.decoder.trained_context
    if init_from:
        source = source_config(Path(init_from))
        # a run from before the context was recorded trained on its own packed sequences
        inherited = max(inherited, source.model.decoder.trained_context or source.data.packing.seq_len)
    cfg.model.decoder.trained_context = max(inherited, cfg.data.packing.seq_len)


def source_config(path: Path) -> Config:
    """The config of what `--init-from` names: a run or checkpoint, or a folder of `mm1 export` (`--hf` too)."""
    if (path / "mm1_config.json").exists():
        from mm1.files import read_json

        return from_saved(read_json(path / "mm1_config.json"))
    run, _ = ckpt.resolve(path)
    return load(run / "config.json")


def init_weights(model: MLLM, cfg: Config, path: Path) -> None:
    """Start from a checkpoint's (or an export's) weights, strict about names. A dense checkpoint into an
    MoE model is upcycled; position tables trained at another resolution are interpolated (SFT at 672 px
    from a 378-px pre-training checkpoint)."""
    from mm1.model.size import check_fits
    from mm1.model.weights import fit_position_tables, load_strict
    from mm1.store.hf import import_exported

    if (path / "mm1_config.json").exists():
        source, _ = import_exported(path)  # checks the size before it builds
        what = str(path)
    else:
        run, ck = ckpt.resolve(path)
        source_cfg = load(run / "config.json")
        check_fits(source_cfg, training=False)  # the run started from is checked as the run itself is
        source = MLLM(source_cfg.model)
        ckpt.load_model_weights(ck, source)
        what = str(ck)
    state = fit_position_tables(source.state_dict(), model)
    if cfg.model.moe.num_experts and not source.cfg.moe.num_experts:
        upcycle_from_dense(model, state)
    else:
        load_strict(model, state, what=f"weights from {what}")


class LMObjective:
    """Next-token prediction of the MLLM on the stage's packed sequences (pre-training and SFT)."""

    unit = "tokens"

    def __init__(self, cfg: Config, tok: Tokenizer, *, world_size: int, fresh: bool, init_from: str | None) -> None:
        resolve_model_config(cfg, len(tok), tok.image_id)
        self.tok = tok
        if fresh:  # a resumed run's saved config holds it already
            record_trained_context(cfg, init_from)
        self.cfg, self.world = cfg, world_size
        self.stats = DataStats()
        self.stream = DataStream(cfg, tok, stats=self.stats)  # first: missing data fails before any work
        self.init_from = init_from
        self.names = self.stream.names
        with torch.device("meta"):  # shapes only: what FLOPs are counted from
            self.connector_params = sum(p.numel() for p in MLLM(cfg.model).connector.parameters())

    def build(self) -> MLLM:
        return MLLM(self.cfg.model)

    def load_start(self, model: MLLM) -> None:
        if self.init_from:
            init_weights(model, self.cfg, Path(self.init_from))
        else:  # the pre-trained LLM and image encoder the config names, if any
            load_pretrained(model, self.cfg)

    def rule_parameters(self) -> int:
        return lr_rule_parameters(self.cfg.model)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        return self.stream.batch(step, rank, world_size)

    def loader(self, *, start: int, stop: int, rank: int, world_size: int, num_workers: int):
        return make_loader(self.stream, start=start, stop=stop, rank=rank, world_size=world_size,
                           num_workers=num_workers)

    # ------------------------------------------------------------------ one step
    def begin_step(self, batch: Batch, *, accum: int, device: torch.device) -> list[Batch]:
        """The step's micro-batches; the predicted-token count over all ranks normalises the loss."""
        predicted = all_reduce_sum(torch.tensor([(batch.labels_BT != IGNORE).sum().item()], dtype=torch.float64),
                                   device)
        self.total_pred = max(1.0, float(predicted.item()))
        self.step, self.accum, self.device = batch.step, accum, device
        S = len(self.names)
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.src_sum, self.src_cnt = torch.zeros(S, device=device), torch.zeros(S, device=device)
        self.moe_sum: torch.Tensor | None = None
        self.count = count_batch(batch.tokens_BT, batch.labels_BT, batch.doc_ids_BT, sum(batch.images_per_row))
        return batch.split(accum)

    def loss(self, model: torch.nn.Module, micro: Batch) -> torch.Tensor:
        """This micro-batch's share of the step loss (what its backward needs)."""
        out: MLLMOutput = model(**micro.model_inputs(), num_sources=len(self.names), vision_always=self.world > 1)
        # DDP/FSDP average gradients over ranks: times the world size, it is the sum-then-divide of one
        # big batch.
        loss = out.loss_sum * (self.world / self.total_pred)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss / self.accum
            self._collect_moe(out)
        self.loss_sum += out.loss_sum.detach().double()
        self.src_sum += out.source_loss_sum_S
        self.src_cnt += out.source_count_S
        return loss

    def end_step(self) -> StepMetrics:
        S, device = len(self.names), self.device
        reduced = all_reduce_sum(torch.cat([self.loss_sum.float().reshape(1), self.src_sum, self.src_cnt]), device)
        c = self.count
        count = StepCount(*(int(x) for x in all_reduce_sum(
            torch.tensor([c.tokens, c.labelled, c.attention_pairs, c.images], dtype=torch.float64), device)))
        extra = {f"loss.{self.names[i]}": float(reduced[1 + i] / reduced[1 + S + i])
                 for i in range(S) if reduced[1 + S + i] > 0}
        extra |= self._moe_metrics()
        extra |= {f"epochs.{k}": v for k, v in self.stream.epochs(self.step).items()}
        return StepMetrics(loss=float(reduced[0]) / self.total_pred, count=count.tokens,
                           flops=step_flops(self.cfg, count, connector_params=self.connector_params), extra=extra)

    def _collect_moe(self, out: MLLMOutput) -> None:
        """Sum the micro-batch's routing statistics (mean over MoE layers) on the device: read back once, in
        `end_step`, not per layer and micro-batch."""
        stats = out.moe_stats
        row = torch.cat([torch.stack([s.load_balance_loss for s in stats]).mean().reshape(1),
                         torch.stack([s.z_loss for s in stats]).mean().reshape(1),
                         torch.stack([s.expert_share_E for s in stats]).mean(0)]).detach().float()
        self.moe_sum = row if self.moe_sum is None else self.moe_sum + row

    def _moe_metrics(self) -> dict[str, float]:
        if self.moe_sum is None:
            return {}
        lb, z, *share = (v / self.accum for v in self.moe_sum.tolist())
        return {"moe_load_balance": lb, "moe_z_loss": z} | {f"expert_share.{e}": v for e, v in enumerate(share)}

    def finish(self, model: torch.nn.Module, out: Path, *, is_main: bool, completed: bool,
               skipped: dict[str, int]) -> None:
        """After the last step (or a stop): what the data stream read and left out; after a finished LM
        stage, the decoder as a transformers folder, `out/decoder` (what `model.decoder.init=out` reads)."""
        if is_main:
            from mm1.files import write_json

            stats = {"prepared": self.stream.manifests(), "at_load": self.stats.to_dict(),
                     "skipped_in_batches": skipped}
            write_json(out / "data_stats.json", stats)
        if completed and self.cfg.train.stage == Stage.LM:
            export_lm_decoder(model, self.cfg, self.tok, out / LM_DECODER, is_main=is_main)
