//! [`Certificates`] on the AWS IoT control plane.

use aws_sdk_iot::types::CertificateStatus;
use shared::aws::{classify, Failure};

use crate::ports::{Attached, Certificates};

/// The id in a certificate ARN (`arn:aws:iot:<region>:<account>:cert/<id>`).
pub fn certificate_id(arn: &str) -> Option<&str> {
    arn.rsplit_once(":cert/").map(|(_, id)| id)
}

impl Certificates for aws_sdk_iot::Client {
    async fn attached(&self, thing: &str) -> Result<Vec<Attached>, Failure> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        // A thing holds a handful of certificates; the pages are bounded all the same.
        for _ in 0..10 {
            let page = self
                .list_thing_principals()
                .thing_name(thing)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| classify(&e))?;
            for arn in page.principals() {
                if let Some(id) = certificate_id(arn) {
                    out.push(Attached {
                        certificate_id: id.to_owned(),
                        arn: arn.clone(),
                    });
                }
            }
            match page.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn retire(&self, thing: &str, certificate: &Attached) -> Result<(), Failure> {
        // Inactive first: from then on it cannot connect, whatever the detach does.
        self.update_certificate()
            .certificate_id(&certificate.certificate_id)
            .new_status(CertificateStatus::Inactive)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        match self
            .detach_thing_principal()
            .thing_name(thing)
            .principal(&certificate.arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Detached already (a repeated event): done.
            Err(e) => match classify(&e) {
                Failure::Service(code) if code == "ResourceNotFoundException" => Ok(()),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_the_arns_last_part() {
        assert_eq!(
            certificate_id("arn:aws:iot:ap-northeast-1:123456789012:cert/abc123"),
            Some("abc123")
        );
        assert_eq!(certificate_id("arn:aws:iam::123456789012:user/x"), None);
    }
}
