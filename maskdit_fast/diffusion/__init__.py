"""EDM diffusion: preconditioning, the MaskDiT loss, samplers."""
from .edm import EDMPrecond
from .loss import LossTerms, dsm_loss, edm_loss, edm_weight, mae_loss, sample_sigma
from .samplers import edm_sample, edm_time_steps

__all__ = ["EDMPrecond", "LossTerms", "dsm_loss", "edm_loss", "edm_weight", "mae_loss", "sample_sigma",
           "edm_sample", "edm_time_steps"]
