"""Layer 5: the pipeline's other stages: step 1 (train) and step 2 (binarize), and the model summary
behind `bats flops`.
"""
