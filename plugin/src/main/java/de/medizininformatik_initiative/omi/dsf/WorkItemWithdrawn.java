package de.medizininformatik_initiative.omi.dsf;

import java.util.Objects;

import org.camunda.bpm.engine.delegate.DelegateTask;
import org.camunda.bpm.engine.delegate.TaskListener;
import org.hl7.fhir.r4.model.QuestionnaireResponse;
import org.hl7.fhir.r4.model.QuestionnaireResponse.QuestionnaireResponseStatus;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.InitializingBean;

import dev.dsf.bpe.v1.ProcessPluginApi;

/**
 * Withdraws an external work item whose user task ended without an answer: its timeout fired, or the
 * process ended meanwhile (a failing step in another branch of a parallel step terminates the
 * process). The in-progress QuestionnaireResponse becomes {@code stopped}, the one change of status
 * the DSF allows besides {@code completed}, so no worker starts the step any more; a worker running it
 * finds its answer refused (the response changed) and drops it.
 * <p>
 * {@link WorkItemListener} notes the response's id as a local variable of the user task when it
 * creates it; the BPMN calls this listener on the task's {@code delete} event, which the engine
 * raises only for a task that ends without being completed.
 */
public class WorkItemWithdrawn implements TaskListener, InitializingBean
{
	/** The user task's local variable holding the id of its QuestionnaireResponse. */
	static final String RESPONSE_ID = "omiWorkItemResponseId";

	private static final Logger logger = LoggerFactory.getLogger(WorkItemWithdrawn.class);

	private final ProcessPluginApi api;

	public WorkItemWithdrawn(ProcessPluginApi api)
	{
		this.api = api;
	}

	@Override
	public void afterPropertiesSet()
	{
		Objects.requireNonNull(api, "api");
	}

	@Override
	public void notify(DelegateTask userTask)
	{
		Object id = userTask.getVariableLocal(RESPONSE_ID);
		if (!(id instanceof String responseId))
			return;
		try
		{
			var client = api.getFhirWebserviceClientProvider().getLocalWebserviceClient();
			QuestionnaireResponse response = client.read(QuestionnaireResponse.class, responseId);
			if (!QuestionnaireResponseStatus.INPROGRESS.equals(response.getStatus()))
				return;
			response.setStatus(QuestionnaireResponseStatus.STOPPED);
			client.withMinimalReturn().update(response);
			logger.info("Work item QuestionnaireResponse/{} withdrawn: its user task ended without an answer",
					responseId);
		}
		catch (Exception e)
		{
			// answered meanwhile, or the server is away: a worker's late answer then finds no task
			logger.warn("Unable to withdraw work item QuestionnaireResponse/{}: {} - {}", responseId,
					e.getClass().getName(), e.getMessage());
		}
	}
}
