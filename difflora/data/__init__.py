"""Stage 1, data: an image folder in, usable examples and their tensors out.

Takes a folder of images with captions (`scan`: files, `N_name` repeats, metadata files; `images`: decoding
any image people have; `captions`: reading and augmenting captions), sizes each image into an aspect-ratio
bucket (`buckets`), orders them into batches that are a pure function of the seed (`batches`), and caches
VAE latents and text embeddings on disk (`cache`). Hands `Example`s, bucketed batches and cached tensors to
`difflora.training`. Needs no model weights except the VAE and text encoder that fill the cache.
"""
