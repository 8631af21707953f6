"""Decoding: `options` (SamplingOptions), `sampling` (how a token is drawn),
`sampler` (the static greedy/sampling and beam loops), `continuous`
(refilled slots, and groups of beams),
`postprocess` and `mbr`. They talk through public names only."""
