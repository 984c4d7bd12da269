"""Self-data synthesis: the policy makes its own RL data with a diffusion model as critic.

- :mod:`~nemo_viper.synthesis.stage1`: caption -> redraw -> self-critique -> refinements (``caption_refine``);
- :mod:`~nemo_viper.synthesis.stage2`: hard entities -> edit operations -> edit -> filter (``visual_op``);
- :mod:`~nemo_viper.synthesis.run`: :func:`run_synthesis`, the resumable, shardable job behind
  ``nemo-viper synth`` (chunks and commits in :mod:`~nemo_viper.synthesis.chunks`);
- :mod:`~nemo_viper.synthesis.config`: the typed configuration, presets and config hash;
- :mod:`~nemo_viper.synthesis.vlm` (the policy through the rollout backend interface),
  :mod:`~nemo_viper.synthesis.diffusion` (diffusers pipelines), :mod:`~nemo_viper.synthesis.tiny_diffusion`;
- :mod:`~nemo_viper.synthesis.parsers`, :mod:`~nemo_viper.synthesis.entities`,
  :mod:`~nemo_viper.synthesis.filters`, :mod:`~nemo_viper.synthesis.inputs`,
  :mod:`~nemo_viper.synthesis.samples` (per-sample seeds): the pure pieces.

Usage and layout: ``docs/synthesis.md``.
"""
