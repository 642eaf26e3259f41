"""What every stage's run shares: opening the model and its calibration batches, identifying
it, collecting its statistics once, and applying a plan and saving the result.

It sits under the stages (`moe_compress.stages`) and the engines they drive (methods,
slimming), and over the source, the walk and the sink, which it ties together.
"""
