"""KL-regularised autoencoder: the first stage of latent diffusion (inference only)."""
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder


class AutoencoderKL(nn.Module):
    """Accepts the standard config keys; training ones (lossconfig, monitor, ...) are ignored."""

    ENCODER_KEYS = ("encoder.*", "quant_conv.*")  # what drop_encoder goes without

    def __init__(self, ddconfig, embed_dim, lossconfig=None, ckpt_path=None, ignore_keys=(),
                 image_key="image", colorize_nlabels=None, monitor=None, **_training_only):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z: true")
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self._unread = []

    def drop_encoder(self):
        """Go without the encoder (text-to-image only decodes): 136 MB of fp32 weights less
        on the device. A file's encoder weights are then dropped unread (see unread_keys)."""
        del self.encoder, self.quant_conv
        self._unread = list(self.ENCODER_KEYS)

    def unread_keys(self) -> list:
        return list(self._unread)

    def encode(self, x):
        """The latent of images `x` in [-1, 1]: the posterior's mean (its mode; sampling it is
        for training), before the model's scale_factor."""
        if not hasattr(self, "encoder"):
            raise RuntimeError("this VAE was built without its encoder (decoding only): load "
                               "the model with vae_encoder=True to encode images")
        mean, _logvar = torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)
        return mean

    def decode(self, z, tick=None):
        return self.decoder(self.post_quant_conv(z), tick)
