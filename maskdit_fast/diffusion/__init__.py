"""Diffusion: EDM (preconditioning, the MaskDiT loss, Heun/Euler samplers) and DDPM as DiT trains and
samples it (schedule, eps + learned variance behind the same denoiser interface, hybrid loss,
DDPM / DDIM samplers)."""
from .ddpm import Schedule
from .ddpm_loss import ddpm_loss
from .ddpm_precond import DDPMPrecond
from .ddpm_samplers import ddim_sample, ddpm_sample, eps_model
from .denoiser import Denoiser
from .edm import EDMPrecond, build_net
from .loss import LossTerms, dsm_loss, edm_loss, edm_weight, mae_loss, sample_sigma
from .samplers import edm_sample, edm_time_steps

__all__ = ["DDPMPrecond", "Denoiser", "EDMPrecond", "LossTerms", "Schedule", "build_net", "ddim_sample",
           "ddpm_loss", "ddpm_sample", "dsm_loss", "edm_loss", "edm_sample", "edm_time_steps", "edm_weight",
           "eps_model", "mae_loss", "sample_sigma"]
