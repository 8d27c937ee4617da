"""icnet_eval: evaluate ICNet on Cityscapes exactly as its authors did (MATLAB imresize, eval_acc.m scoring)."""
