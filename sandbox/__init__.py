"""What runs inside an untrusted valrun worker: standard library and RestrictedPython only."""
