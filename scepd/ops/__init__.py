"""Operations: metrics, audit, logging context, rate limits, the agent inventory, the ops routes."""
