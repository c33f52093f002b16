"""Config targets of Stability's generative-models (`sgm.*`) and the classes of ours that build
the same modules under the same names, so their configs (sd_xl_base.yaml) work as they are."""

SGM_TARGETS = {
    "sgm.models.diffusion.DiffusionEngine": "ldm.models.diffusion.ddpm.DiffusionEngine",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel":
        "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "sgm.modules.GeneralConditioner": "ldm.modules.encoders.sdxl.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner":
        "ldm.modules.encoders.sdxl.GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder":
        "ldm.modules.encoders.clip_text.FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2":
        "ldm.modules.encoders.sdxl.FrozenOpenCLIPEmbedder2",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND":
        "ldm.modules.encoders.sdxl.ConcatTimestepEmbedderND",
    "sgm.models.autoencoder.AutoencoderKL": "ldm.models.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": "ldm.models.autoencoder.AutoencoderKL",
}
