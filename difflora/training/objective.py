"""The run's training objective from its config and its model's family: the noising and the loss target
(ε, v or flow matching), with the checks and notes that depend on which one the family trains."""

from __future__ import annotations

import dataclasses
import logging

from difflora.config.train import TrainConfig
from difflora.errors import ConfigError
from difflora.models.families.flow import TimestepSampling
from difflora.training.run import Objective
from difflora.training.setup import Models

logger = logging.getLogger(__name__)


def objective_for(config: TrainConfig, models: Models) -> Objective:
    family = models.identity.model_family
    sampling = (
        TimestepSampling(
            config.timestep_sampling, config.timestep_mean, config.timestep_scale, config.timestep_shift
        )
        if config.timestep_sampling
        else None
    )
    objective = Objective.for_pipe(
        models.pipe,
        config.noise_offset,
        config.min_snr_gamma,
        zero_terminal_snr=config.zero_terminal_snr,
        flow=family.flow_schedule(dict(models.pipe.scheduler.config), sampling),
        guidance=config.guidance,
        latent_config=family.latent_encoder(models.pipe.vae).config,
    )
    objective = dataclasses.replace(objective, unmasked_weight=config.unmasked_weight)
    if objective.flow is not None:
        warn_unused_noise_settings(config, models.identity.name)
    if config.zero_terminal_snr and objective.prediction_type == "epsilon":
        raise ConfigError(
            "--zero-terminal-snr needs a v-prediction model: at zero signal an epsilon-prediction model has "
            f"nothing to predict, and {models.identity.name} predicts epsilon. Use an SD 2.x 768-v base, "
            "or train without --zero-terminal-snr."
        )
    return objective


def warn_unused_noise_settings(config: TrainConfig, model: str) -> None:
    """One line when --min-snr-gamma or --noise-offset was set for a flow-matching objective: they weight
    and perturb ε/v noising, which a rectified flow does not use (its σ follow --timestep-sampling)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    given = [
        f"--{name.replace('_', '-')} {getattr(config, name):g}"
        for name in ("min_snr_gamma", "noise_offset")
        if getattr(config, name) != defaults[name]
    ]
    if given:
        why = "they are ε/v settings; its timesteps follow --timestep-sampling"
        logger.warning("%s: not applied, %s trains with flow matching (%s).", " and ".join(given), model, why)
