"""Evaluation: Frechet distances (FID, FD-DINOv2), the FID InceptionV3, the ShapesWorld detector and
its scores. `launch.evaluate` drives them."""
