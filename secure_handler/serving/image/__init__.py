"""Images: header parsers and cost caps, one decode path, the classifier and the detector."""
