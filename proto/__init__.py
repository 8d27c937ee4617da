"""Caffe protobuf schema (caffe.proto) and its generated bindings (caffe_pb2)."""
