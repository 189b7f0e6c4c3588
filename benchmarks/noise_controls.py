"""The method or the anchor? VIMPO under flipped rewards, against the controls a reviewer asks for (issue 34).

Pre-registered in ``benchmarks/results/noise_controls/preregistration.md`` (committed before any run; that file is
the plan, this docstring its summary).

**Question.** Does VIMPO (``vimpo_beta`` 5e-2, fixed actor weight 5e-3: the setting of the paper-claims study's
positive result) beat the strongest anchored GRPO under the paper's noise model?

**Noise.** ``gnivo_trl.rewards.NoisyReward``: group flips (primary; every 0/1 reward of a prompt's group flipped
together with probability p per group, as the authors' ``apply_group_reward_noise``, mode
``group_flip_binary_score``) and independent flips (secondary), p = 0.25, keyed by the run's seed, the step and the
group's (completion's) index in the generation batch, so every method at a seed sees the same flips.

**Cells**, in priority order: ``group-h8``, ``group-tool``, ``group-h4``, then ``indep-h8``, ``indep-tool``,
``indep-h4`` (8-step and 4-step synthetic problems with ``benchmarks/protocol.py``'s protocol; the tool task with
``benchmarks/agent_learning.py``'s). **Methods**: ``grpo`` (beta 0), ``grpo-kl0.01`` / ``grpo-kl0.04`` /
``grpo-kl0.1`` (TRL's KL penalty), ``grpo-noscale`` (``scale_rewards="none"``: the std-normalisation control, not an
anchor), ``rloo``, ``vimpo-b5e-2-c5e-3`` and ``vimpo-b5e-4-adaptive``; the GRPO family and RLOO run before VIMPO
within a cell.

**Tuning** on validation (seeds 0, 1): rates in steps of sqrt(2) from 5e-5 to 4e-4 (1.6e-3 on the tool task), the
same for every method, chosen on the mean late validation accuracy; a choice at an edge of its grid extends that
method's grid by one step beyond the edge, before any test run, until interior or a bound (1.25e-5; 3.2e-3, tool
6.4e-3). The strongest anchored GRPO (``GRPO-KL*``) is the beta in {0.01, 0.04, 0.1} with the best validation
score at its chosen rate (0.1 chosen: the beta grid extends to 0.25, 0.625).

**Test**: 10 seeds (10-19) per method at its chosen rate; metric: late test accuracy (mean of the evaluations in the
last 20% of training). Primary comparison per group-flip cell: VIMPO − ``GRPO-KL*``, paired by seed: paired 95% t
interval, paired t-test and exact Wilcoxon signed-rank test, each Holm-adjusted over the claim-1 family (the
group-flip cells run, m = 3); "reproduced at this scale" if the mean is positive and both adjusted p-values are
below 0.05, "not reproduced" if the 95% interval lies below the paper's +3.7 pp, "inconclusive" otherwise; the claim
is reproduced if every primary comparison is, not reproduced if any is not. Collapsed run: final accuracy more than
5 points below its own step 0. Secondary analyses, the "method or anchor" rule, the budget and the cut order (4-step
cells first, then independent flips): the pre-registration.
"""
