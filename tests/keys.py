"""A real SSH public key for tests that pass keys through (its private half is thrown
away: no test logs in with it)."""

PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4jUfZbYVeBgShrhKKFm8Ys+w/PLdngtYfZZ3EYTM12 rockpool-test"
)
