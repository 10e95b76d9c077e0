"""ADM configurations the benchmarks time (guided-diffusion `create_model` keywords)."""

CONFIGS = {
    # The reference fixture's architecture.
    "adm_tiny_32px": dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                          attention_resolutions="16", num_heads=4, num_head_channels=16,
                          learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True),
    # A mid-size ADM: the ImageNet-64 layout at 128 channels.
    "adm_mid_64px": dict(image_size=64, num_channels=128, num_res_blocks=2, channel_mult="",
                         attention_resolutions="32,16,8", num_head_channels=64,
                         learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True),
    # A small 64-px ADM (6.4 M parameters, attention at three resolutions): the end-to-end benchmark's.
    "adm_small_64px": dict(image_size=64, num_channels=32, num_res_blocks=2, channel_mult="1,2,3,4",
                           attention_resolutions="32,16,8", num_head_channels=32,
                           learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True),
    # The packaged default model's architecture (ddcm_jax/weights/default), at its training size.
    "default_model_128px": dict(image_size=128, num_channels=64, num_res_blocks=1, channel_mult="1,2,2,4",
                                attention_resolutions="16,8", num_head_channels=32,
                                learn_sigma=False, use_scale_shift_norm=True, resblock_updown=False),
}  # fmt: skip
