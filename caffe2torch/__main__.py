"""`python -m caffe2torch`: the command line."""

from caffe2torch.cli import main

main()
