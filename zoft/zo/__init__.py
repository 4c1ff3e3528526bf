"""The zeroth-order optimizer: the trained tensors and their seeded z (trainable, noise), how a step
evaluates L(θ ± εz) (perturbers, with estimate), the update rule (update), and the Triton kernels (kernels)."""
