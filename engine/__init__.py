"""tritonq.engine: layer-wise quantization algorithms and the pipeline that drives them."""
