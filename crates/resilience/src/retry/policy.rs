//! When to retry: attempts, backoff, budget and a predicate, as a tower `Policy`.

use super::backoff::{Backoff, Delays};
use super::budget::RetryBudget;
use super::error::InvalidRetry;
use std::future::Future;
use std::sync::Arc;
use tokio::time::Sleep;
use tower::retry::Policy;

/// Decides whether one result is worth retrying. Implemented for every
/// `Fn(&Req, &Result<Res, E>) -> bool`, so a closure works; the request is
/// there so the decision can depend on e.g. the HTTP method
/// (see [`is_idempotent`](super::is_idempotent)).
pub trait Retryable<Req, Res, E> {
    /// True when this result should be retried.
    fn is_retryable(&self, request: &Req, result: &Result<Res, E>) -> bool;
}

impl<Req, Res, E, F> Retryable<Req, Res, E> for F
where
    F: Fn(&Req, &Result<Res, E>) -> bool,
{
    fn is_retryable(&self, request: &Req, result: &Result<Res, E>) -> bool {
        self(request, result)
    }
}

/// The default predicate: retry every `Err`, never an `Ok`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryErrors;

impl<Req, Res, E> Retryable<Req, Res, E> for RetryErrors {
    fn is_retryable(&self, _: &Req, result: &Result<Res, E>) -> bool {
        result.is_err()
    }
}

/// A retry policy: at most `max_attempts` tries (the first one included),
/// waiting per [`Backoff`] in between, only for results the predicate `P`
/// calls retryable, and only while the shared [`RetryBudget`] (if any) allows.
///
/// It implements tower's [`Policy`], so [`RetryLayer`](super::RetryLayer) and
/// `tower::retry::Retry` use it directly; [`run`](RetryPolicy::run) is the plain
/// async form.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use switchboard_resilience::retry::{Backoff, RetryBudget, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let policy = RetryPolicy::new(3, Backoff::constant(Duration::from_millis(1)))
///     .unwrap()
///     .with_budget(Arc::new(RetryBudget::default()));
/// let mut calls = 0;
/// let result: Result<u32, &str> = policy
///     .run(|attempt| {
///         calls += 1;
///         async move { if attempt < 2 { Err("flaky") } else { Ok(attempt) } }
///     })
///     .await;
/// assert_eq!(result, Ok(2));
/// assert_eq!(calls, 3);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy<P = RetryErrors> {
    max_attempts: u32,
    backoff: Backoff,
    budget: Option<Arc<RetryBudget>>,
    predicate: P,
    /// Per request (tower clones the policy for each request): tries so far.
    attempts: u32,
    delays: Delays,
}

impl RetryPolicy {
    /// Retries every error, up to `max_attempts` tries in all, no budget.
    pub fn new(max_attempts: u32, backoff: Backoff) -> Result<Self, InvalidRetry> {
        if max_attempts == 0 {
            return Err(InvalidRetry::ZeroAttempts);
        }
        Ok(Self {
            max_attempts,
            backoff,
            budget: None,
            predicate: RetryErrors,
            attempts: 0,
            delays: backoff.delays(),
        })
    }
}

impl<P> RetryPolicy<P> {
    /// The same policy, drawing retries from `budget` (share one `Arc` across
    /// all requests to the same upstream).
    #[must_use]
    pub fn with_budget(self, budget: Arc<RetryBudget>) -> Self {
        Self {
            budget: Some(budget),
            ..self
        }
    }

    /// The same policy, retrying only what `predicate` calls retryable.
    pub fn with_predicate<P2>(self, predicate: P2) -> RetryPolicy<P2> {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            budget: self.budget,
            predicate,
            attempts: 0,
            delays: self.backoff.delays(),
        }
    }

    /// Tries in all, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff between tries.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The shared budget, if any.
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.budget.as_ref()
    }

    /// After try number `tried` (from 1) ended in a retryable result: the
    /// delay before the next try, or `None` when out of attempts or budget.
    /// Deposits in the budget on the first try.
    fn next_delay(&mut self, tried: u32, retryable: bool) -> Option<std::time::Duration> {
        if tried == 1
            && let Some(budget) = &self.budget
        {
            budget.deposit();
        }
        if !retryable || tried >= self.max_attempts {
            return None;
        }
        if let Some(budget) = &self.budget
            && !budget.withdraw()
        {
            return None;
        }
        self.delays.next()
    }

    /// Runs `op` (given the attempt number, from 0) until it succeeds, the
    /// error is not retryable, or attempts or budget run out; returns the last result.
    pub async fn run<F, Fut, T, E>(&self, mut op: F) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: Retryable<(), T, E> + Clone,
    {
        let mut this = self.clone();
        this.delays = self.backoff.delays();
        let mut attempt = 0;
        loop {
            let result = op(attempt).await;
            attempt += 1;
            let retryable = this.predicate.is_retryable(&(), &result);
            match this.next_delay(attempt, retryable) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return result,
            }
        }
    }
}

impl<P, Req, Res, E> Policy<Req, Res, E> for RetryPolicy<P>
where
    P: Retryable<Req, Res, E>,
    Req: Clone,
{
    type Future = Sleep;

    fn retry(&mut self, request: &mut Req, result: &mut Result<Res, E>) -> Option<Sleep> {
        self.attempts += 1;
        let retryable = self.predicate.is_retryable(request, result);
        self.next_delay(self.attempts, retryable)
            .map(tokio::time::sleep)
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }
}
