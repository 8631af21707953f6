"""Decoding: `options` (SamplingOptions), `sampling` (how a token is drawn),
`sampler` (the static and beam loops), `continuous` (refilled slots),
`postprocess` and `mbr`. They talk through public names only."""
