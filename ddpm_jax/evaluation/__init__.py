"""Evaluation (`--mode=eval`: `evaluate`): bits/dim of a split under the variational bound
(`bpd`) with the rate-distortion curve (`rate_distortion`), and FID/IS of sample sets
(`sample_quality`) with their metrics (`fid`) and feature networks (`inception`,
`digits_features`)."""
