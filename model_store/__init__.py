"""Models and artifacts in the BentoML store: backbones, embedders, index artifacts, stages."""
