"""Producers of models for the bitq passes: ONNX loading/normalisation and its Relax import."""

# Function attribute a producer of Relax modules sets as a naming hint for the bitq passes:
# weight parameter name -> layer name (the ONNX frontend: ONNX node names, which plans use).
LAYER_NAMES_ATTR = "bitq.layer_names"
