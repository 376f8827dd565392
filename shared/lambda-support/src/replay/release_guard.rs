// Kept alone in its file so that a test can compile exactly this with the release settings.
// The Runtime API proxy rewrites what the Lambda service hands the function: it belongs to
// `cargo lambda watch` on a developer's machine, never to a deployed binary. `cargo lambda
// build --release` does not enable the feature; this stops anything that would.
#[cfg(all(feature = "local-replay", not(debug_assertions)))]
compile_error!(
    "the local-replay feature is for local runs under `cargo lambda watch` only: \
     it must never be part of a release build"
);
