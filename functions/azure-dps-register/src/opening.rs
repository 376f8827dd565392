//! A connection to DPS opened alongside the checks that decide whether it is needed: its TCP
//! and TLS round trips overlap the device table's, instead of following them. Nothing about the
//! device goes over it until the SIM is cleared and admitted; if it is not, the connection is
//! dropped unused.

use std::future::Future;
use std::pin::Pin;

use dps_client::DpsError;
use tokio::time::{timeout_at, Instant};

type Pending<'a, L> = Pin<Box<dyn Future<Output = Result<L, DpsError>> + Send + 'a>>;

/// An opening connection (or none), progressing whenever work is awaited [`Self::alongside`].
pub(crate) struct Opening<'a, L> {
    pending: Option<Pending<'a, L>>,
    opened: Option<Result<L, DpsError>>,
}

impl<'a, L> Opening<'a, L> {
    pub(crate) fn none() -> Self {
        Self {
            pending: None,
            opened: None,
        }
    }

    pub(crate) fn start(open: impl Future<Output = Result<L, DpsError>> + Send + 'a) -> Self {
        Self {
            pending: Some(Box::pin(open)),
            opened: None,
        }
    }

    pub(crate) fn is_started(&self) -> bool {
        self.pending.is_some() || self.opened.is_some()
    }

    /// Awaits `work` while the connection keeps opening.
    pub(crate) async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> T {
        let Some(pending) = self.pending.as_mut() else {
            return work.await;
        };
        tokio::pin!(work);
        // The opening is polled first: its first poll sends the TCP SYN before the work's
        // first request goes out.
        tokio::select! {
            biased;
            opened = pending => {
                self.pending = None;
                self.opened = Some(opened);
                work.await
            }
            done = &mut work => done,
        }
    }

    /// The connection, once open (by `deadline`, else as a failed opening), or `None` if none
    /// was started.
    pub(crate) async fn finish(self, deadline: Instant) -> Option<Result<L, DpsError>> {
        if let Some(opened) = self.opened {
            return Some(opened);
        }
        let pending = self.pending?;
        Some(timeout_at(deadline, pending).await.unwrap_or_else(|_| {
            Err(DpsError::Connection(
                "no connection to DPS before the deadline".into(),
            ))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_connection_opens_while_work_is_awaited() {
        let mut opening = Opening::start(async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok::<_, DpsError>(7)
        });
        let started = Instant::now();
        let work = opening
            .alongside(tokio::time::sleep(Duration::from_millis(50)))
            .await;
        assert_eq!(work, ());
        // Opened during the work: nothing left to wait for.
        let line = opening.finish(started + Duration::from_secs(1)).await;
        assert_eq!(line, Some(Ok(7)));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn short_work_leaves_the_rest_of_the_opening_to_finish() {
        let mut opening = Opening::start(async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            Ok::<_, DpsError>(7)
        });
        let started = Instant::now();
        opening
            .alongside(tokio::time::sleep(Duration::from_millis(20)))
            .await;
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        let line = opening.finish(started + Duration::from_secs(1)).await;
        assert_eq!(line, Some(Ok(7)));
        assert_eq!(started.elapsed(), Duration::from_millis(80));
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_past_the_deadline_is_a_failed_connection() {
        let opening = Opening::start(std::future::pending::<Result<u8, DpsError>>());
        let deadline = Instant::now() + Duration::from_millis(100);
        let line = opening.finish(deadline).await;
        assert!(matches!(line, Some(Err(DpsError::Connection(_)))));
        assert_eq!(Instant::now(), deadline);
    }

    #[tokio::test]
    async fn nothing_started_is_nothing_to_finish() {
        let opening = Opening::<u8>::none();
        assert!(!opening.is_started());
        assert_eq!(opening.finish(Instant::now()).await, None);
    }
}
