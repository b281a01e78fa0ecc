"""The parallel layout of a run, derived from its config and world size without torch.

`Layout.of(cfg, world_size)` is the one place where the data-parallel size (dp = world_size / (tp * pp)),
the expert-data-parallel size (dp / ep) and the gradient accumulation (global_batch_size /
(micro_batch_size * dp)) are derived; config validation, the trainer and the launchers read them here.
`Layout.problems` says why a world size does not fit the config, in the words of `validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cpmtp_dist.config import Config

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Degrees and batch sizes of a run on `world_size` processes (world = tp * pp * dp; ep splits dp).

    `ep`, `global_batch_size` and `micro_batch_size` may be None when unknown (a setting of the wrong
    type, during validation): the checks that need them are then left out.
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int | None = 1
    global_batch_size: int | None = None
    micro_batch_size: int | None = None

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> Layout:
        """The layout of `cfg` on `world_size` processes."""
        par, train = cfg.parallel, cfg.train
        return cls(world_size, par.tp, par.pp, par.ep, train.global_batch_size, train.micro_batch_size)

    @property
    def model_parallel(self) -> int:
        """Ranks holding one replica of the model: tp * pp."""
        return self.tp * self.pp

    @property
    def fits(self) -> bool:
        """Whether the world size, degrees and batch sizes fit together."""
        return not self.problems()

    @property
    def dp(self) -> int:
        """Data-parallel size: world_size / (tp * pp). Raises ValueError when it does not divide."""
        if self.world_size % self.model_parallel:
            raise ValueError(self._world_problem())
        return self.world_size // self.model_parallel

    @property
    def expert_dp(self) -> int:
        """Data-parallel ranks holding the same CP components: dp / ep. Raises ValueError when it does not
        divide."""
        dp = self.dp
        if self.ep is None or dp % self.ep:
            raise ValueError(self._ep_problem(dp))
        return dp // self.ep

    @property
    def grad_accum(self) -> int:
        """Micro-batches per rank and step: global_batch_size / (micro_batch_size * dp). Raises ValueError
        when it does not divide."""
        dp, gbs, mbs = self.dp, self.global_batch_size, self.micro_batch_size
        if gbs is None or mbs is None:
            raise ValueError(
                "the gradient accumulation needs train.global_batch_size and train.micro_batch_size"
            )
        if gbs % (mbs * dp):
            raise ValueError(self._accum_problem(dp, gbs, mbs))
        return gbs // (mbs * dp)

    def problems(self) -> list[str]:
        """Why the world size does not fit the degrees or the batch sizes (none when it fits)."""
        if self.world_size % self.model_parallel:
            return [self._world_problem()]
        dp = self.world_size // self.model_parallel
        problems = []
        if self.ep is not None and dp % self.ep:
            problems.append(self._ep_problem(dp))
        gbs, mbs = self.global_batch_size, self.micro_batch_size
        if gbs is not None and mbs is not None and gbs % (mbs * dp):
            problems.append(self._accum_problem(dp, gbs, mbs))
        return problems

    def _world_problem(self) -> str:
        mp = self.model_parallel
        return (
            f"world_size={self.world_size} is not divisible by parallel.tp * parallel.pp = {self.tp} * {self.pp} = "
            f"{mp}: launch a multiple of {mp} processes or change parallel.tp / parallel.pp"
        )

    def _ep_problem(self, dp: int) -> str:
        return (
            f"parallel.ep={self.ep} does not divide the data-parallel size dp = {dp} (world_size "
            f"{self.world_size} / (tp {self.tp} * pp {self.pp})): the components are shared out among "
            "data-parallel ranks, so set parallel.ep to a divisor of dp"
        )

    def _accum_problem(self, dp: int, gbs: int, mbs: int) -> str:
        per_step = mbs * dp
        return (
            f"train.global_batch_size={gbs} is not divisible by "
            f"train.micro_batch_size * dp = {mbs} * {dp} = {per_step} "
            f"(dp = world_size {self.world_size} / (tp {self.tp} * pp {self.pp})): set "
            f"train.global_batch_size to a multiple of {per_step} or lower train.micro_batch_size"
        )
