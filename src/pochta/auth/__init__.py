"""Authentication: password hashing (`passwords`), SASL mechanisms (`sasl`, with `scram`),
brute-force defence (`throttle`) and SASLprep (`saslprep`).

The package imports nothing itself; import the submodules. They use stdlib, argon2-cffi,
`pochta.errors` and `pochta.store.api` only.
"""
