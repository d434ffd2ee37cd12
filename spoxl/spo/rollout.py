"""SPO's data: the rollout stream (prompts -> pool sampler -> pairs -> all-gather/deal -> buffer).

The same interface as spoxl.data.streams (next() + state_dict()/load_state_dict() for exact resume).
`next()` serves micro-batches of transition pairs from this rank's buffer; when the buffer runs
short, every rank samples a round together:

  1. this rank's prompts: consecutive slices of a per-pass permutation of the prompt set
     (spoxl.rng.PROMPT_ORDER, the same on every rank), each rank its own part;
  2. the pool sampler (spoxl.spo.pool_sampler) with the current policy, from noise that depends on
     (run seed, rank, round) only (spoxl.rng.ROUND_SAMPLING);
  3. the kept pairs of all ranks are all-gathered, permuted once (spoxl.rng.ROUND_SHUFFLE) and dealt
     in equal shares; what does not fill a micro-batch on every rank waits for the next round;
  4. with `inner_epochs` E > 1 (method.num_inner_epochs, as DDPO's train.num_inner_epochs; the
     official SPO code trains each round's pairs once, which E = 1 is) this rank's share is served
     E times: as dealt, then E - 1 reorderings of it (spoxl.rng.PAIR_REPLAY), each made when the
     buffer runs dry, so every pair of a round is in E micro-batches. The loss compares the policy with the frozen reference, not with the policy
     that sampled, so a replayed pair's loss means what a fresh pair's does.

Why shuffle instead of only averaging gradients (DeepSpeed averages them anyway): the number of
kept pairs differs per rank and per round, and under ZeRO-3 every rank must run the same number of
forwards. All-gather + one permutation gives every rank exactly the same number of pairs (so the
same number of micro-batches and UNet calls), keeps every kept pair, and mixes prompts and
timesteps from all ranks into every micro-batch, as the official code does.

The stream ends (StopIteration on every rank at once) after `epochs` passes over the prompt set.
"""

from __future__ import annotations

import torch

from spoxl import rng
from spoxl.errors import SpoxlError
from spoxl.models.text import encode_with_negative
from spoxl.spo.pairs import PairBatch, all_gather_pairs, deal, shared_permutation


class RolloutStream:
    def __init__(self, run, sampler, prompts: list[str], *, prompts_per_rank: int, micro_batch_size: int, seed: int,
                 resolution: int, time_ids: torch.Tensor, epochs: int | None = None, max_empty_rounds: int = 50,
                 inner_epochs: int = 1):  # fmt: skip
        self.run = run  # spoxl.engine.view.RunView: sampling(), components, device, rank, world size, log
        self.sampler, self.prompts = sampler, prompts
        self.prompts_per_rank, self.micro_batch_size, self.seed = prompts_per_rank, micro_batch_size, seed
        self.resolution, self.time_ids = resolution, time_ids
        self.epochs, self.max_empty_rounds = epochs, max_empty_rounds
        if inner_epochs < 1:
            raise SpoxlError(f"SPO: inner_epochs must be >= 1, got {inner_epochs}")
        self.inner_epochs = inner_epochs
        self.round = 0  # sampling rounds done (all ranks in step)
        self.buffer: PairBatch | None = None  # this rank's dealt (or replayed) pairs not yet served
        # The last round's share, kept for its replays (inner_epochs > 1; None when none are left):
        # one copy, each reordering made only when it is served.
        self.share: PairBatch | None = None
        self.share_round = 0  # the round that share came from (its reorderings' seed)
        self.next_pass = 1  # the share's next pass (passes 1 .. inner_epochs - 1 are replays)
        self.leftover: PairBatch | None = None  # pairs that did not fill a micro-batch on every rank
        self.empty_rounds = 0

    # ---- the stream ------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> PairBatch:
        mb = self.micro_batch_size
        # The buffer length is the same on every rank (equal deals), so every rank decides to
        # sample at the same time and the collectives inside sample_round line up.
        while self.buffer is None or len(self.buffer) < mb:
            if self.share is not None:  # the last round's replays come before a new round
                self.buffer = self._cat(self.buffer, self.replay_pass())
                continue
            if self.epochs_done():
                raise StopIteration  # every rank at once: the round counter and buffer are the same everywhere
            fresh = self.sample_round()
            if len(fresh) == 0:
                self.empty_rounds += 1
                if self.empty_rounds >= self.max_empty_rounds:
                    raise SpoxlError(
                        f"SPO: {self.empty_rounds} sampling rounds in a row gave no trainable pairs "
                        f"(threshold {self.sampler.config.threshold}); lower method.threshold or raise "
                        f"method.preference.scale")  # fmt: skip
                continue
            self.empty_rounds = 0
            self.buffer = self._cat(self.buffer, fresh)
        batch, self.buffer = self.buffer.index(slice(0, mb)), self.buffer.index(slice(mb, None))
        return batch

    @staticmethod
    def _cat(buffer: PairBatch | None, more: PairBatch) -> PairBatch:
        return more if buffer is None or not len(buffer) else PairBatch.cat([buffer, more])

    def replay_pass(self) -> PairBatch:
        """The share's next pass: a reordering that is a function of (run seed, the share's round,
        pass) only, so a resumed run replays exactly what the uninterrupted one did, and the same on
        every rank. A pass is a whole number of micro-batches (deal gives a multiple of one)."""
        p = self.next_pass
        order = torch.randperm(len(self.share), generator=rng.generator(rng.PAIR_REPLAY, self.seed,
                                                                         counter=(self.share_round, p)))  # fmt: skip
        replay = self.share.index(order)
        self.next_pass += 1
        if self.next_pass >= self.inner_epochs:
            self.share = None  # every pass served: free it
        return replay

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "empty_rounds": self.empty_rounds,
            "buffer": self.buffer.state() if self.buffer is not None else None,
            "leftover": self.leftover.state() if self.leftover is not None else None,
            "share": self.share.state() if self.share is not None else None,
            "share_round": self.share_round,
            "next_pass": self.next_pass,
        }

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.empty_rounds = int(state.get("empty_rounds", 0))
        self.buffer = PairBatch.from_state(state["buffer"]) if state.get("buffer") is not None else None
        self.leftover = PairBatch.from_state(state["leftover"]) if state.get("leftover") is not None else None
        self.share = PairBatch.from_state(state["share"]) if state.get("share") is not None else None
        self.share_round = int(state.get("share_round", 0))
        self.next_pass = int(state.get("next_pass", 1))

    # ---- rounds ----------------------------------------------------------------------------

    def round_prompts(self) -> list[str]:
        """This rank's prompts for the current round: consecutive slices of a per-pass permutation
        (same on every rank), each rank its own part. Not spoxl.data.prompts.shard_prompts (a fixed
        strided split of one list): SPO needs a fresh order every pass, a position that is a
        function of the round counter alone (resume), and rounds that run across a pass boundary."""
        n, per, run = len(self.prompts), self.prompts_per_rank, self.run
        per_round = per * run.world_size
        out = []
        for j in range(per):
            pos = self.round * per_round + run.rank * per + j
            epoch, i = divmod(pos, n)
            order = torch.randperm(n, generator=rng.generator(rng.PROMPT_ORDER, self.seed, counter=epoch))
            out.append(self.prompts[int(order[i])])
        return out

    def epochs_done(self) -> bool:
        """Whether `epochs` passes over the prompt set have all been sampled."""
        if self.epochs is None:
            return False
        return self.round * self.prompts_per_rank * self.run.world_size >= self.epochs * len(self.prompts)

    def sample_round(self) -> PairBatch:
        """One round on every rank (a collective): sample, all-gather, shuffle, deal."""
        run = self.run
        comps = run.components
        prompts = self.round_prompts()
        # The round's sampling noise: a function of (seed, rank, round) only, so a resumed run
        # samples exactly what the uninterrupted one did.
        gen = rng.generator(rng.ROUND_SAMPLING, self.seed, rank=run.rank, counter=self.round)
        cond, uncond = encode_with_negative(comps, prompts)
        side = self.resolution // (2 ** (len(comps.vae.config.block_out_channels) - 1))
        latents = torch.randn((len(prompts), comps.unet.config.in_channels, side, side), generator=gen)
        time_ids = self.time_ids.expand(len(prompts), -1)
        with run.sampling() as policy:
            result = self.sampler.sample(policy, prompts, cond.to(run.device), uncond.to(run.device),
                                         time_ids, latents.to(run.device), gen)  # fmt: skip
        self._log_round(result)
        everyone = all_gather_pairs(result.pairs.to(run.device), run.device).to("cpu")
        if self.leftover is not None and len(self.leftover):
            everyone = PairBatch.cat([self.leftover, everyone])
        perm = shared_permutation(len(everyone), rng.generator(rng.ROUND_SHUFFLE, self.seed, counter=self.round), run.device)
        mine, self.leftover = deal(everyone, perm, run.rank, run.world_size, self.micro_batch_size)
        if self.inner_epochs > 1 and len(mine):  # served again, reordered, after this pass (__next__)
            self.share, self.share_round, self.next_pass = mine, self.round, 1
        self.round += 1
        return mine

    def _log_round(self, result) -> None:
        """Acceptance per timestep and the mean final-image score, summed over ranks."""
        import torch.distributed as dist

        run = self.run
        ts = sorted(result.offered, reverse=True)
        stats = torch.tensor(
            [[result.accepted[t], result.offered[t]] for t in ts]
            + [[float(result.final_scores.sum()), result.final_scores.numel()], [len(result.pairs), 1]],
            dtype=torch.float64, device=run.device,
        )  # fmt: skip
        if dist.is_available() and dist.is_initialized() and run.world_size > 1:
            dist.all_reduce(stats)
        stats = stats.cpu()
        step = run.global_step
        for t, (acc, off) in zip(ts, stats[: len(ts)].tolist()):
            run.log(f"spo/acceptance/t{t:03d}", acc / max(off, 1), step)
        total_acc, total_off = stats[: len(ts)].sum(0).tolist()
        run.log("spo/acceptance/all", total_acc / max(total_off, 1), step)
        run.log("spo/final_score", stats[len(ts), 0].item() / max(stats[len(ts), 1].item(), 1), step)
        run.log("spo/pairs_per_round", stats[len(ts) + 1, 0].item(), step)
        run.log("spo/round", self.round, step)
