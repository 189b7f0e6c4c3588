"""GN-IVO as a TRL `GRPOTrainer` subclass.

Implementation notes (users read the class docstring and the GN-IVO trainer page of the docs):

* At generation time, `_add_group_statistics` computes on the gathered, global rewards every group quantity the loss
  needs (target weights, membership, weight sums, group sizes, the horizon `T_g`) and slices it back to the local rows.
* When `per_device_train_batch_size` is a multiple of `num_generations`, whole groups are shuffled (never single rows),
  every micro-batch holds complete groups, and the exact loss is computed with the current policy's group softmax.
  This is required whenever the policy moves while a generation batch is in use (`num_iterations > 1`, or
  `steps_per_generation` not dividing `gradient_accumulation_steps`).
* Otherwise the policy cannot have moved since generation (the config refuses the other case), the group softmax is
  uniform, and each row's gradient needs only the generation-time group quantities
  (`gnivo_trl.losses.gnivo_linearized_row_loss`), so groups may be split over micro-batches and processes.
* Either way the gradient of an optimizer step equals that of the mean of `L_g` over all groups of the global batch
  (docs/algorithms.md#layout-independence). Rows with a NaN reward and rows masked by vLLM's sequence-level
  importance sampling leave their group; with `"sequence_truncate"` the ratio multiplies the row's target weight.
* Tool output (`tool_mask` 0) takes no part in the loss, its prefix sums or its units; `gnivo_prefix_unit="turn"`
  closes a unit at the last model token of each assistant turn (`gnivo_trl.steps.turn_unit_ends`).
"""

from __future__ import annotations

import logging
import textwrap
from typing import Any

import torch
from trl import GRPOTrainer

from ._trl_private import profiled
from .gnivo_config import GNIVOConfig
from .group_bookkeeping import GroupBookkeepingMixin, loss_mask
from .losses import (
    GroupWeights,
    gnivo_group_losses,
    gnivo_linearized_row_loss,
    group_weights,
    prefix_log_ratios,
    unit_boundaries,
)
from .steps import TokenTextCache, step_unit_ends, turn_unit_ends

__all__ = ["GNIVOTrainer"]

logger = logging.getLogger(__name__)

_GROUP_FIELDS = ("gnivo_weights", "gnivo_member", "gnivo_weight_sum", "gnivo_group_size")


class GNIVOTrainer(GroupBookkeepingMixin, GRPOTrainer):
    """Trainer for Group-Normalized Implicit Value Optimization (GN-IVO), a drop-in subclass of TRL's `GRPOTrainer`.

    GN-IVO ([Choi et al., ICLR 2026](https://openreview.net/forum?id=eFXmrCun0c)) reads a soft value for every prefix
    of a completion off the policy itself, the prefix log-ratio `log pi_theta(y_<=t) / pi_old(y_<=t)`. It fits these
    values, through a softmax over the K completions of a prompt, to the target weights `softmax(R / alpha)`,
    averaged exactly over every prefix. The loss is [`gnivo_loss`][gnivo_trl.losses.gnivo_loss]. Everything else is
    `GRPOTrainer`'s: generation (transformers or vLLM), reward functions, `beta`'s KL penalty to the frozen initial
    model, DeepSpeed ZeRO, PEFT, logging, checkpoints and Hub pushes.

    The [GN-IVO trainer page](https://gnivo-trl.github.io/gnivo-trl/gnivo_trainer/) explains the prefix units, the
    batch layout, the logged metrics and what is refused.

    Args:
        model (str | PreTrainedModel): The policy, as for `GRPOTrainer`: a Hub id, a local directory or a loaded
            causal LM.
        reward_funcs (Callable | list[Callable] | str | None): The reward functions, as for `GRPOTrainer`.
        args (GNIVOConfig): The configuration. Defaults to `GNIVOConfig("<model name>-GNIVO")`. A plain `GRPOConfig`
            is refused (`TypeError`): it lacks the `gnivo_*` fields.
        **kwargs (Any): Every other `GRPOTrainer` argument (`train_dataset`, `processing_class`, `peft_config`,
            `tools`, `environment_factory`, `callbacks`, ...).

    Examples:
        ```python
        from gnivo_trl import GNIVOConfig, GNIVOTrainer
        from gnivo_trl.data import load_math_dataset
        from gnivo_trl.rewards import math_accuracy_reward

        trainer = GNIVOTrainer(
            model="Qwen/Qwen2.5-Math-1.5B",
            reward_funcs=math_accuracy_reward,
            args=GNIVOConfig(output_dir="qwen-gnivo", gnivo_prefix_unit="step"),
            train_dataset=load_math_dataset("math"),
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "gnivo"]
    _name = "GN-IVO"
    _paper = {
        "title": "Group-Normalized Implicit Value Optimization for Language Models",
        "id": None,  # ICLR 2026 (OpenReview eFXmrCun0c); no arXiv id to link from the model card
        "citation": textwrap.dedent("""\
            @inproceedings{choi2026gnivo,
                title        = {{Group-Normalized Implicit Value Optimization for Language Models}},
                author       = {Yunseon Choi and Junyoung Jang and Chaeyoung Oh and Minchan Jeong and Doo Hwan Hwang and Kee-Eung Kim},
                booktitle    = {The Fourteenth International Conference on Learning Representations, {ICLR} 2026},
                year         = 2026,
                url          = {https://openreview.net/forum?id=eFXmrCun0c},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: GNIVOConfig | None = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config.name_or_path
            args = GNIVOConfig(f"{model_name.split('/')[-1]}-GNIVO")
        elif not isinstance(args, GNIVOConfig):
            raise TypeError(
                f"args must be a GNIVOConfig, got {type(args).__name__}. Build one with GNIVOConfig(...): it carries "
                "every GRPOConfig field plus the gnivo_* fields."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if args.gnivo_prefix_unit == "turn" and not self.tools and self.rollout_func is None:
            # Turns are separated by tool output; without tools, an environment or a rollout_func's env_mask there is
            # none, and every completion is a single turn.
            logger.warning(
                "gnivo_prefix_unit='turn' without tools, environment_factory or rollout_func: every completion is one "
                "turn, so the loss is that of gnivo_prefix_unit='sequence'."
            )
        self._token_texts = None
        if args.gnivo_prefix_unit == "step":
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            self._token_texts = TokenTextCache(tokenizer)

    # ------------------------------------------------------------------------------------------------------------
    # Generation time: per-row group statistics of the whole (global) generation batch
    # ------------------------------------------------------------------------------------------------------------

    def _unit_ends(self, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor | None:
        """Unit boundaries `(B, T)` bool as the loss expects them, for the rows of `mask` (the `(B, T)` loss
        mask, tool output 0): None for tokens, all-False for whole sequences (the loss adds each row's last token),
        the last model token before each tool response for turns, the decoded delimiters for steps."""
        unit = self.args.gnivo_prefix_unit
        if unit == "token":
            return None
        if unit == "sequence":
            return torch.zeros_like(mask, dtype=torch.bool)
        if unit == "turn":
            # Read off the mask itself, so it is recomputed for whatever rows (and order) the caller holds.
            return turn_unit_ends(mask)
        return inputs["gnivo_unit_ends"]

    def _add_group_statistics(self, output, global_rewards, local, group_size, mode) -> None:
        mask = loss_mask(output)
        if self.args.gnivo_prefix_unit == "step":
            output["gnivo_unit_ends"] = step_unit_ends(
                output["completion_ids"], mask, self._token_texts, self.args.gnivo_step_delimiter
            )
        num_units = unit_boundaries(mask, self._unit_ends(output, mask)).sum(dim=1)
        global_units = self._gather_rows(num_units)
        ratio = output.get("importance_sampling_ratio")
        global_ratio = self._gather_rows(ratio.reshape(-1).float()) if ratio is not None else None
        weights = group_weights(
            global_rewards,
            group_size,
            self.args.gnivo_alpha,
            self.args.gnivo_weight_normalization,
            importance_ratio=global_ratio,
        )
        horizon = torch.where(weights.member, global_units, 0).reshape(-1, group_size).amax(dim=1)
        for name, value in zip(_GROUP_FIELDS, weights):
            output[name] = value[local]
        output["gnivo_group_horizon"] = horizon.repeat_interleave(group_size)[local]

        # Every rank holds the same global tensors here, so these metrics need no further reduction.
        weight_sum = weights.weights.reshape(-1, group_size).sum(dim=1)
        has_weight = weight_sum > 0
        p = weights.weights.reshape(-1, group_size)[has_weight] / weight_sum[has_weight, None]
        entropy = -(torch.where(p > 0, p * p.clamp(min=1e-30).log(), 0.0)).sum(dim=1)
        metrics = self._metrics[mode]
        metrics["gnivo/weight_entropy"].append(entropy.mean().item() if entropy.numel() else float("nan"))
        metrics["gnivo/prefix_horizon"].append(horizon.float().mean().item())
        metrics["gnivo/member_fraction"].append(weights.member.float().mean().item())

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    @profiled
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        group_size = self._group_size(mode)
        logp, entropies, aux_loss = self._policy_token_logps(model, inputs)
        mask = loss_mask(inputs)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old  # TRL omits it when the policy has not moved
        unit_ends = self._unit_ends(inputs, mask)

        if mode == "train" and self._keeps_groups_whole:
            # Whole groups in this micro-batch: exact loss with the current group softmax.
            order = torch.argsort(inputs["row_group_index"], stable=True)
            prefix = prefix_log_ratios(
                logp[order], old[order], mask[order], None if unit_ends is None else unit_ends[order]
            )
            weights = GroupWeights(*(inputs[name][order] for name in _GROUP_FIELDS))
            group_loss_sum = gnivo_group_losses(prefix.values, prefix.num_units, weights, group_size).sum()
        else:
            # Policy unchanged since generation: each row's exact gradient from generation-time group quantities.
            row_losses = gnivo_linearized_row_loss(
                logp,
                old,
                mask,
                unit_ends,
                *(inputs[name] for name in _GROUP_FIELDS),
                group_horizon=inputs["gnivo_group_horizon"],
            )
            group_loss_sum = row_losses.sum()
        # Mean over the groups of this micro-batch (rows / K of them, fractional when groups are split); summed over
        # the accumulation window and averaged by DDP over processes, this is the mean over the global batch.
        gnivo_loss = group_loss_sum / (logp.size(0) / group_size)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = gnivo_loss / accumulation

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(logp - old)
            loss = loss + self.beta * (per_token_kl * mask).sum() / self._token_mean_normalizer(inputs, mode)
            self._log_mean_over_processes(mode, "kl", (per_token_kl.detach() * mask).sum(), mask.sum())

        loss = self._add_aux_loss(loss, aux_loss, mode)
        self._log_mean_over_processes(mode, "gnivo/loss", gnivo_loss.detach(), torch.ones((), device=logp.device))
        self._log_mean_over_processes(mode, "entropy", (entropies.detach() * mask).sum(), mask.sum())
        return loss
