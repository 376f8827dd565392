//! claim-issuer: provisioning by trusted user. An installer signed in with Amazon Cognito (the
//! HTTP API's JWT authorizer has verified the token) asks for a claim certificate; the function
//! checks group membership and a per-user rate limit, calls `CreateProvisioningClaim`, records
//! an audit entry that fleet-prehook uses for claim binding, and returns the short-lived
//! certificate and key.

pub mod config;
pub mod handler;
pub mod iot;
pub mod request;
