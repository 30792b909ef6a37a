"""convshard: train CNNs on every device at once by sharding conv kernels."""
